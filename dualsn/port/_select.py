"""Nested checkpoints: flattening them (:func:`flatten_state_dict`) and choosing the state dict
to load (:func:`select_state_dict`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from dualsn.adapters import adapter as _adapter
from dualsn.adapters import framework_of
from dualsn.keys import group_keys
from dualsn.port._keys import _dotted
from dualsn.port._limits import MAX_NESTING
from dualsn.port._tensors import _is_tensor
from dualsn.port._types import CheckpointError


def flatten_state_dict(state: Mapping[str, Any]) -> dict[str, Any]:
    """``state`` with its nested mappings flattened: their keys are joined with ``.``
    (``{"netG": {"conv.weight": w}}`` -> ``{"netG.conv.weight": w}``; an integer key becomes
    its decimal string). Everything that is not a mapping (tensors, numbers, lists) is a value
    as it is, and a flat state dict comes back as a plain copy.

    :func:`load_checkpoint` returns nested checkpoints (a trainer's ``{"netG": ..., "epoch":
    3}``) as they were written; :func:`load_state_dict` flattens what it is given with this.
    Raises ValueError when two entries flatten to the same key, when a mapping is reached twice
    (shared or cyclic: its entries would repeat), or when mappings nest deeper than
    :data:`MAX_NESTING`.
    """
    flat: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(mapping: Mapping, prefix: str, depth: int) -> None:
        where = repr(prefix) if prefix else "the top level"
        if id(mapping) in seen:
            raise ValueError(f"the mapping at {where} is reached twice (shared or cyclic): flattening "
                             "would repeat its entries")
        if depth > MAX_NESTING:
            raise ValueError(f"mappings nested more than {MAX_NESTING} levels deep (at {where})")
        seen.add(id(mapping))
        for key, value in mapping.items():
            name = _dotted(prefix, key)
            if isinstance(value, Mapping):
                walk(value, name, depth + 1)
            elif name in flat:
                raise ValueError(f"two entries flatten to the same key {name!r}")
            else:
                flat[name] = value

    walk(state, "", 0)
    return flat


WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
"""Key prefixes stripped automatically, but only when *every* key of the chosen state dict has
one and the target has no key with it: ``module.`` (``DataParallel`` /
``DistributedDataParallel``), ``_orig_mod.`` (``torch.compile``), ``model.`` (a PyTorch
Lightning module's ``self.model``). Chains (``module._orig_mod.``) are stripped in turn."""


_OPTIMIZER_KEYS = ("param_groups", "LR_Scheduler")  # torch's optimizer state, Paddle's


@dataclass
class Selection:
    """What :func:`select_state_dict` chose: ``state``, the flat state dict; ``key``, the
    dotted path of its entry in the checkpoint (``""``: the whole checkpoint);
    ``stripped``, the prefix taken off its keys (``""``: none)."""

    state: dict[str, Any]
    key: str = ""
    stripped: str = ""


def _is_optimizer(name: str, mapping: Mapping) -> bool:
    """An optimizer's state (its tensors are no model's): torch's and Paddle's state dicts,
    and entries named like one (``optimizer``, ``optimG``, ``G_optim``)."""
    return "optim" in name.rpartition(".")[2].lower() or any(k in mapping for k in _OPTIMIZER_KEYS)


def _tensor_mappings(checkpoint: Mapping) -> tuple[list[tuple[str, Mapping]], list[tuple[str, Mapping]]]:
    """(every mapping holding a tensor somewhere below it, root first; the *entries*: the
    mappings holding tensors directly, not inside another entry), outside optimizer states."""
    every: list[tuple[str, Mapping]] = []
    entries: list[tuple[str, Mapping]] = []
    seen: set[int] = set()

    def walk(mapping: Mapping, path: str, depth: int, in_entry: bool) -> bool:
        if id(mapping) in seen or depth > MAX_NESTING:
            return False
        seen.add(id(mapping))
        direct = any(_is_tensor(v) for v in mapping.values())
        slot = len(every)
        every.append((path, mapping))
        if direct and not in_entry:
            entries.append((path, mapping))
        below = False
        for key, value in mapping.items():
            name = _dotted(path, key)
            if isinstance(value, Mapping) and not _is_optimizer(name, value):
                below |= walk(value, name, depth + 1, in_entry or direct)
        if not (direct or below):
            del every[slot]
        return direct or below

    walk(checkpoint, "", 0, False)
    return every, entries


def _count_tensors(mapping: Mapping) -> int:
    try:
        return sum(_is_tensor(v) for v in flatten_state_dict(mapping).values())
    except ValueError:
        return 0


def _listing(found: list[tuple[str, Mapping]]) -> str:
    return ", ".join(f"{path or '(the whole checkpoint)'!r} ({_count_tensors(m)} tensors)" for path, m in found)


def _lookup(mapping: Mapping, name: str):
    """The key of ``mapping`` spelled ``name`` (an int key as its decimal string), or None."""
    if name in mapping:
        return name
    if name.lstrip("-").isdigit() and int(name) in mapping:
        return int(name)
    return None


def _entry_at(checkpoint: Mapping, key: str) -> dict[str, Any]:
    """The flat state dict at the dotted path ``key``: nested entries first (the longest key
    that matches, since keys may hold dots), then a dotted prefix of the flat keys below
    (``state_dict.model`` in a Lightning file, whose ``state_dict`` is flat)."""
    node, parts, i = checkpoint, key.split("."), 0
    while i < len(parts):
        if not isinstance(node, Mapping):
            raise CheckpointError(f"key {key!r}: {'.'.join(parts[:i])!r} is a {type(node).__name__}, not a mapping")
        for j in range(len(parts), i, -1):
            found = _lookup(node, ".".join(parts[i:j]))
            if found is not None:
                node, i = node[found], j
                break
        else:
            rest = ".".join(parts[i:]) + "."
            sub = {k[len(rest):]: v for k, v in flatten_state_dict(node).items() if k.startswith(rest)}
            if sub:
                return sub
            _, entries = _tensor_mappings(checkpoint)
            raise CheckpointError(f"key {key!r}: no such entry in the checkpoint; its state dicts: "
                                  f"{_listing(entries) or 'none'}")
    if not isinstance(node, Mapping):
        raise CheckpointError(f"key {key!r} is a {type(node).__name__}, not a state dict")
    return flatten_state_dict(node)


def _strip(state: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    stripped = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}
    if len(stripped) != len(state):
        raise CheckpointError(f"stripping {prefix!r} from the keys of {where} makes two keys the same")
    return stripped


def _prefixed(state: dict[str, Any], strip_prefix: str | None, target_keys, where: str) -> tuple[dict, str]:
    """``state`` with ``strip_prefix`` taken off the keys that have it (an error when none has
    it), then any :data:`WRAPPER_PREFIXES` that every key has and no target key has."""
    done = ""
    if strip_prefix:
        prefix = strip_prefix if strip_prefix.endswith(".") else strip_prefix + "."
        if not any(k.startswith(prefix) for k in state):
            example = next(iter(state), None)
            raise CheckpointError(f"strip_prefix {prefix!r}: no key of {where} starts with it"
                                  + (f" (a key: {example!r})" if example is not None else ""))
        state, done = _strip(state, prefix, where), prefix
    if target_keys is None:
        return state, done
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)
                       and not any(t.startswith(p) for t in target_keys)), None)
        if prefix is None:
            break
        state, done = _strip(state, prefix, where), done + prefix
    return state, done


def select_state_dict(checkpoint: Mapping[str, Any], *, key: str | None = None, strip_prefix: str | None = None,
                      target=None) -> Selection:
    """The state dict to load from ``checkpoint`` (e.g. :func:`load_checkpoint`'s result), flat.

    * ``key``: the dotted path of the entry (``"state_dict"``, ``"G_ema"``, ``"models.netG"``,
      ``"state_dict.model"``: a dotted prefix of flat keys works too).
    * Without ``key``, the mappings that hold tensors (outside optimizer states) are the
      candidates. With a ``target`` model, the one that has every layer of the target is
      chosen (a flat state dict, ``{"state_dict": ..., "optimizer": ...}``, ``{"netG": ...,
      "netD": ..., "epoch": 3}`` for a generator); when several do (``G`` and ``G_ema`` for a
      generator) or none does and there is more than one state dict, :class:`CheckpointError`
      lists the candidates. Without a target a checkpoint that holds tensors directly is its
      own state dict, and one entry is taken when it is the only one.
    * ``strip_prefix`` is taken off every key that has it (an error when none has it).
      :data:`WRAPPER_PREFIXES` (``module.``, ``_orig_mod.``, ``model.``) are stripped
      automatically when every key has one and the target has no key with it.

    Raises CheckpointError as said, and ValueError when the entry cannot be flattened
    (:func:`flatten_state_dict`).
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"Expected a mapping, but got {type(checkpoint).__name__}")
    target_keys = None
    if target is not None:
        target_keys = list(_adapter(framework_of(target)).state(target))
    if key is not None:
        if not isinstance(key, str) or not key:
            raise ValueError(f"Expected key to be a non-empty dotted path, but got key={key!r}")
        state, stripped = _prefixed(_entry_at(checkpoint, key), strip_prefix, target_keys, repr(key))
        return Selection(state, key, stripped)

    every, entries = _tensor_mappings(checkpoint)
    if target_keys is not None and every:
        fitting = _fitting(every, strip_prefix, target_keys)
        if len(fitting) == 1:
            return fitting[0]
        if len(fitting) > 1:
            raise CheckpointError(
                f"the checkpoint holds {len(fitting)} state dicts that fit the model: "
                f"{_listing([(f.key, f.state) for f in fitting])}; pick one with key=... (--key)")
    if not entries or entries[0][0] == "":
        chosen = ""
    elif len(entries) == 1:
        chosen = entries[0][0]
    else:
        fits = " none of them has every layer of the model;" if target_keys is not None else ""
        raise CheckpointError(f"the checkpoint holds {len(entries)} state dicts: {_listing(entries)};{fits} "
                              "pick one with key=... (--key)")
    state = flatten_state_dict(checkpoint) if chosen == "" else _entry_at(checkpoint, chosen)
    state, stripped = _prefixed(state, strip_prefix, target_keys, repr(chosen) if chosen else "the checkpoint")
    return Selection(state, chosen, stripped)


def _fitting(candidates: list[tuple[str, Mapping]], strip_prefix, target_keys) -> list[Selection]:
    """The candidate mappings that have every layer of the target, as selections."""
    layers = set(group_keys(target_keys))
    fitting = []
    for path, mapping in candidates:
        try:
            state, stripped = _prefixed(flatten_state_dict(mapping), strip_prefix, target_keys,
                                        repr(path) if path else "the checkpoint")
        except ValueError:  # CheckpointError included: this candidate cannot be the one
            continue
        if layers <= set(group_keys(state)):
            fitting.append(Selection(state, path, stripped))
    return fitting
