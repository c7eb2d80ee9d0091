"""Every file the tool writes goes through the write gate (bt_fast.safeio).

An AST scan of bt_fast/, pipelines/ and kernels/ for every other way to write a file:
open() with a write mode, write_text/write_bytes, torch.save/np.save/savefig/PIL's
save, json.dump/yaml.dump into a stream, shutil copies and moves, renames, links,
os.open with write flags, pwrite/truncate, temp files. A write call is fine inside a
lambda handed to ``safeio.write_atomic`` when it writes into that lambda's own file
argument (``lambda f: torch.save(obj, f)``). Anything else needs an entry in ALLOWED,
with its reason.
"""

import ast

import pytest

from conftest import REPO

ROOTS = [REPO / "bt_fast", REPO / "pipelines", REPO / "kernels"]

# (module path relative to the repo, call name) -> why it may write outside the gate
ALLOWED = {
    ("bt_fast/safeio.py", "*"): "the gate itself",
    ("bt_fast/runlock.py", "os.open"): "the lock lives on the lock file's inode: opened in place, never renamed",
    ("bt_fast/runlock.py", "os.ftruncate"): "the lock file's holder record is rewritten in place (same inode)",
    ("bt_fast/runlock.py", "os.pwrite"): "the lock file's holder record is rewritten in place (same inode)",
}

ANY_RECEIVER = {"write_text", "write_bytes", "savefig", "save_file", "tofile", "to_csv", "savetxt",
                "symlink_to", "hardlink_to", "touch", "rename", "replace", "copyfile", "copy", "copy2",
                "copytree", "move", "mkstemp", "NamedTemporaryFile", "SpooledTemporaryFile",
                "savez", "savez_compressed", "pwrite", "ftruncate", "truncate", "link", "symlink"}
# `X.save(...)`: PIL images, torch/numpy. Our own modules whose save() is the gate's are fine.
GATED_SAVERS = {"config", "checkpoint"}
STREAM_DUMPS = {"json.dump", "yaml.dump", "yaml.safe_dump", "pickle.dump", "torch.save", "np.save",
                "numpy.save"}
WRITE_FLAGS = {"O_WRONLY", "O_RDWR", "O_CREAT", "O_APPEND", "O_TRUNC"}
MODE_CHARS = set("wax+")


def dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return dotted(node.func) + "()"
    return "?"


def open_mode(call: ast.Call):
    mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:
        return "r"
    return mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "?"


def writes(call: ast.Call) -> str | None:
    """The call's name if it may write a file, else None."""
    name = dotted(call.func)
    last = name.rsplit(".", 1)[-1]
    if last == "open" and name != "os.open":
        mode = open_mode(call)
        return name if mode == "?" or MODE_CHARS & set(mode) else None
    if name == "os.open":
        flags = {n.attr for n in ast.walk(call) if isinstance(n, ast.Attribute)} | {
            n.id for n in ast.walk(call) if isinstance(n, ast.Name)}
        return name if flags & WRITE_FLAGS else None
    if name in STREAM_DUMPS:
        return name if name != "yaml.safe_dump" and name != "yaml.dump" or len(call.args) > 1 else None
    if last == "save":
        receiver = name.rsplit(".", 1)[0] if "." in name else ""
        return None if receiver in GATED_SAVERS else name
    if last in ANY_RECEIVER:
        if last == "replace" and not name.startswith("os."):
            return None if isinstance(call.func, ast.Attribute) and _is_str_replace(call) else name
        if last in {"copy", "move", "link", "symlink", "truncate", "rename"}:
            return name if name.split(".")[0] in {"shutil", "os"} or last == "rename" else None
        return name
    return None


def _is_str_replace(call: ast.Call) -> bool:
    """str.replace / dataclasses.replace take 2+ args or keywords; Path.replace takes one."""
    name = dotted(call.func)
    return name.startswith("dataclasses.") or len(call.args) != 1


def gate_lambda_params(tree) -> dict:
    """{id(lambda): its parameter names} for every lambda passed to a write_atomic call."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and dotted(node.func).endswith("write_atomic"):
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                if isinstance(arg, ast.Lambda):
                    out[id(arg)] = {a.arg for a in arg.args.args}
    return out


def offenders_in(path, rel: str) -> list[str]:
    tree = ast.parse(path.read_text())
    parents = {id(c): p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    gated = gate_lambda_params(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = writes(node)
        if name is None or (rel, "*") in ALLOWED or (rel, name) in ALLOWED:
            continue
        if _into_gate_file(node, parents, gated):
            continue
        found.append(f"{rel}:{node.lineno}: {name}(...)")
    return found


def _into_gate_file(call: ast.Call, parents: dict, gated: dict) -> bool:
    """True if the call sits in a lambda given to write_atomic and writes to its file arg."""
    node = call
    while id(node) in parents:
        node = parents[id(node)]
        if isinstance(node, ast.Lambda) and id(node) in gated:
            params = gated[id(node)]
            return any(isinstance(a, ast.Name) and a.id in params for a in call.args)
    return False


def scan() -> list[str]:
    found = []
    for root in ROOTS:
        for path in sorted(root.rglob("*.py")):
            found += offenders_in(path, str(path.relative_to(REPO)))
    return found


def test_nothing_writes_a_file_around_the_gate():
    offenders = scan()
    assert not offenders, ("write through bt_fast.safeio (write_atomic / open_append), or add an "
                           "ALLOWED entry with its reason:\n" + "\n".join(offenders))


@pytest.mark.parametrize("source", [
    "open(p, 'w').write('x')", "open(p, mode='ab')", "open(p, m)", "Path(p).write_text('x')",
    "p.write_bytes(b'')", "torch.save(obj, p)", "np.save(p, a)", "fig.savefig(p)", "img.save(p)",
    "shutil.copyfile(a, b)", "shutil.copy(a, b)", "os.replace(a, b)", "os.rename(a, b)", "p.rename(q)",
    "os.link(a, b)", "json.dump(obj, f)", "yaml.safe_dump(obj, f)", "os.open(p, os.O_WRONLY | os.O_CREAT)",
    "tempfile.mkstemp()", "p.replace(q)", "p.touch()", "gzip.open(p, 'wt')",
])
def test_the_scan_catches_each_way_to_write(tmp_path, source):
    """The scanner is not vacuous: each planted write is found."""
    f = tmp_path / "planted.py"
    f.write_text(source + "\n")
    assert offenders_in(f, "planted.py"), source


@pytest.mark.parametrize("source", [
    "open(p)", "open(p, 'rb')", "os.open(p, os.O_RDONLY)", "s.replace('a', 'b')", "yaml.safe_dump(obj)",
    "config.save(cfg, p)", "safeio.write_atomic(p, lambda f: torch.save(obj, f))",
    "safeio.write_atomic(p, lambda f: Image.fromarray(a).save(f, format='JPEG'))",
    "dataclasses.replace(v, size=1)", "gzip.open(p, 'rb')",
])
def test_the_scan_passes_reads_and_gated_writes(tmp_path, source):
    f = tmp_path / "planted.py"
    f.write_text(source + "\n")
    assert offenders_in(f, "planted.py") == [], source


def test_a_gated_lambda_writing_elsewhere_is_caught(tmp_path):
    f = tmp_path / "planted.py"
    f.write_text("safeio.write_atomic(p, lambda f: torch.save(obj, 'elsewhere.pt'))\n")
    assert offenders_in(f, "planted.py")
