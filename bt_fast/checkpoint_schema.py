"""What a bt_fast checkpoint must hold, checked on load, for what the command needs.

``torch.load(weights_only=True)`` already refuses code, but not a dict of the wrong
shape: an older layout without optimizer or RNG state, another tool's state dict, a
doctored file with a string where a tensor goes. Without this check those end deep in
``load_state_dict``, ``set_rng_state`` or the first optimizer step as a traceback.

Two needs (``NEEDS``):

- ``weights`` (eval, export, report): ``model`` (str -> tensor, with ``backbone.*``),
  ``config`` (section -> mapping), ``step`` (int >= 0) when present;
- ``resume`` (train): the above plus ``optimizer`` (torch's layout), ``scaler``
  (mapping), ``step``, ``rng`` and ``pipeline`` (one entry per rank) and, when present,
  ``data_entries`` (int64 vector) and ``method_state`` (one mapping per rank: SwAV's queue).

``problems(ckpt, need)`` lists what is wrong, pure; ``checkpoint.load`` turns the first
into one CheckpointError line naming the file and the key. Shapes against the model the
config builds are checked where the model exists (``check_optimizer``, and
``load_state_dict`` inside train/eval).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

NEEDS = {
    "weights": ("model", "config"),
    "resume": ("model", "config", "optimizer", "scaler", "step", "rng", "pipeline"),
}
MT19937_WORDS = 625  # random.getstate()'s internal state: 624 words + position
WRAPPERS = ("module.", "_orig_mod.")  # DDP and torch.compile prefixes (see dist.unwrap)


def strip_wrappers(state: Mapping) -> dict:
    """A state_dict with DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes
    removed (the keys of ``dist.unwrap(model).state_dict()``)."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPERS:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _model(model) -> str | None:
    if not isinstance(model, Mapping) or not model:
        return f"'model' must be a non-empty mapping of tensors, not {type(model).__name__}"
    for key, value in model.items():
        if not isinstance(key, str):
            return f"'model' has a non-string key {key!r}"
        if not torch.is_tensor(value):
            return f"'model.{key}' is a {type(value).__name__}, not a tensor"
    if not any(k.startswith("backbone.") for k in strip_wrappers(model)):
        return "'model' has no 'backbone.*' tensors (another tool's state dict?)"
    return None


def _config(cfg) -> str | None:
    if not isinstance(cfg, Mapping):
        return f"'config' must be a mapping, not {type(cfg).__name__}"
    for section, values in cfg.items():
        want = list if section == "views" else Mapping  # views: a list of view specs
        if not isinstance(section, str) or not isinstance(values, want):
            return f"'config.{section}' must be a {'list' if want is list else 'mapping'}, not {type(values).__name__}"
    return None


def _optimizer(opt) -> str | None:
    if not isinstance(opt, Mapping) or not isinstance(opt.get("state"), Mapping) \
            or not isinstance(opt.get("param_groups"), Sequence):
        return "'optimizer' is not an optimizer state (needs 'state' and 'param_groups')"
    for i, group in enumerate(opt["param_groups"]):
        if not isinstance(group, Mapping) or not isinstance(group.get("params"), Sequence) \
                or not all(_is_int(p) for p in group["params"]):
            return f"'optimizer.param_groups[{i}]' has no list of parameter ids"
        for name, value in group.items():  # lr, momentum, weight_decay, eta, exclude...
            if name != "params" and not (value is None or isinstance(value, (bool, int, float))):
                return f"'optimizer.param_groups[{i}].{name}' is a {type(value).__name__}, not a number"
    for pid, state in opt["state"].items():
        if not isinstance(state, Mapping):
            return f"'optimizer.state[{pid}]' is a {type(state).__name__}, not a mapping"
        for name, value in state.items():
            if not (torch.is_tensor(value) or isinstance(value, (int, float))):
                return f"'optimizer.state[{pid}].{name}' is a {type(value).__name__}"
    return None


def _rng(rng, rank: int) -> str | None:
    where = f"'rng[{rank}]'"
    if not isinstance(rng, Mapping):
        return f"{where} is a {type(rng).__name__}, not a mapping"
    state = rng.get("torch")
    if not (torch.is_tensor(state) and state.dtype == torch.uint8 and state.dim() == 1):
        return f"{where}.torch must be a uint8 vector (torch.get_rng_state())"
    py = rng.get("python")
    if not (isinstance(py, Sequence) and len(py) == 3 and isinstance(py[1], Sequence)
            and len(py[1]) == MT19937_WORDS and all(_is_int(w) for w in py[1])):
        return f"{where}.python is not a random.getstate() tuple"
    cuda = rng.get("cuda")
    states = cuda if isinstance(cuda, (list, tuple)) else [] if cuda is None else [cuda]
    if not all(torch.is_tensor(s) and s.dtype == torch.uint8 for s in states):
        return f"{where}.cuda must be uint8 tensor(s) (torch.cuda.get_rng_state())"
    return None


def _per_rank(ckpt, key: str) -> str | None:
    value = ckpt[key]
    if not isinstance(value, (list, tuple)) or not value:
        return f"'{key}' must be a list with one entry per rank, not {type(value).__name__}"
    if key == "rng":
        return next((p for r, v in enumerate(value) if (p := _rng(v, r))), None)
    bad = next((r for r, v in enumerate(value) if not isinstance(v, Mapping)), None)
    return None if bad is None else f"'{key}[{bad}]' is a {type(value[bad]).__name__}, not a mapping"


def problems(ckpt, need: str = "weights") -> list[str]:
    """What keeps ``ckpt`` from serving ``need`` ("weights" or "resume"); [] if nothing."""
    if not isinstance(ckpt, Mapping):
        return [f"a {type(ckpt).__name__}, not a checkpoint dict"]
    missing = [k for k in NEEDS[need] if k not in ckpt]
    if missing:
        older = need == "resume" and not {"model", "config"} & set(missing)
        return [f"missing {', '.join(repr(k) for k in missing)}"
                + (" (an older layout, or weights only: eval and export can still read it)" if older else "")]
    found = [_model(ckpt["model"]), _config(ckpt["config"])]
    if "step" in ckpt and not (_is_int(ckpt["step"]) and ckpt["step"] >= 0):
        found.append(f"'step' must be an integer >= 0, not {ckpt['step']!r:.40}")
    if need == "resume":
        found += [_optimizer(ckpt["optimizer"]), _per_rank(ckpt, "rng"), _per_rank(ckpt, "pipeline")]
        if not isinstance(ckpt["scaler"], Mapping):
            found.append(f"'scaler' is a {type(ckpt['scaler']).__name__}, not a mapping")
        for key in ("online_probe", "grad_comm"):  # optional run state of the monitor, PowerSGD
            if ckpt.get(key) is not None and not isinstance(ckpt[key], Mapping):
                found.append(f"'{key}' is a {type(ckpt[key]).__name__}, not a mapping")
        if ckpt.get("method_state") is not None:  # per-rank method state (SwAV's queue)
            found.append(_per_rank(ckpt, "method_state"))
        entries = ckpt.get("data_entries")
        if entries is not None and not (torch.is_tensor(entries) and entries.dtype == torch.int64
                                        and entries.dim() == 1):
            found.append("'data_entries' must be an int64 vector")
    return [p for p in found if p]


def check_optimizer(saved: Mapping, optimizer: torch.optim.Optimizer) -> str | None:
    """Does the saved optimizer state fit this optimizer's parameters (groups, counts,
    state tensor shapes)? torch's own load checks counts only; a wrong momentum shape
    would surface at the first step."""
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups):
        return f"optimizer has {len(saved['param_groups'])} parameter group(s), this model {len(groups)}"
    params = []
    for i, (s, g) in enumerate(zip(saved["param_groups"], groups)):
        if len(s["params"]) != len(g["params"]):
            return f"optimizer group {i} has {len(s['params'])} parameters, this model {len(g['params'])}"
        for key, live in g.items():  # torch's load takes the saved hyperparameters as they are
            if key == "params":
                continue
            if key not in s:
                return f"optimizer group {i} has no '{key}'"
            value = s[key]
            if isinstance(live, bool) != isinstance(value, bool) or \
                    (isinstance(live, (int, float)) and not isinstance(value, (int, float))):
                return f"optimizer group {i}: '{key}' is {value!r:.40}, this optimizer's is {live!r}"
        params += list(zip(s["params"], g["params"]))
    for pid, p in params:
        for name, value in saved["state"].get(pid, {}).items():
            if name == "step":  # a counter (Adam-style); LARS keeps none
                continue
            if not torch.is_tensor(value):
                return f"optimizer state '{name}' of parameter {pid} is a {type(value).__name__}, not a tensor"
            if value.shape != p.shape:
                return (f"optimizer state '{name}' of parameter {pid} has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(p.shape)}")
            if value.dtype != p.dtype:
                return f"optimizer state '{name}' of parameter {pid} is {value.dtype}, the parameter {p.dtype}"
    return None
