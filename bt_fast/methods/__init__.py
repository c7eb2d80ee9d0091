"""One small file per SSL objective and its view preset."""
