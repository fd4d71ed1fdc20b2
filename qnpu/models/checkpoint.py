"""Quantized checkpoints: integer codes, scales, specs, recipe and provenance, bit-exact on reload.

Layout of a checkpoint folder::

    qnpu.json                     format version, qnpu version, source model identity, recipe,
                                  and per quantized linear: weight/activation specs, static
                                  activation qparams keys, online Hadamard flag, and for a
                                  packed layout its ``weight_layout`` ({"kind", ...})
    config.json                   the source model's Hugging Face config
    shard-00000.safetensors ...   tensors; a quantized linear ``L`` stores ``L.codes``,
                                  ``L.scale`` and (asymmetric) ``L.zero_point`` instead of
                                  ``L.weight``, or a packed layout's tensors ``L.<suffix>``
                                  (BiLLM planes, SliM-LLM groups: `qnpu.qcore.BiLLMTensor`,
                                  `qnpu.qcore.MixedTensor`); everything else is stored as is

Format version 1 has `QTensor` weights only; a checkpoint with a packed layout is version 2, so an
older qnpu refuses it by its version instead of misreading it.

A `CheckpointWriter` writes into ``<path>.partial-<pid>`` and renames it to ``path`` only in
`CheckpointWriter.close`, so an interrupted run never leaves a half-written checkpoint at ``path``;
an old checkpoint it replaces is renamed aside and put back if the run is interrupted between the
two renames (`qnpu.qcore.outputs`, which also cleans what killed runs left beside ``path``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import qnpu
from qnpu.qcore import PACKED_LAYOUTS, QSpec, QTensor, is_packed, packed_from_tensors
from qnpu.qcore.qweights import PACKED_SUFFIXES
from qnpu.qcore.outputs import publish, recover, remove, staging

FORMAT = "qnpu-checkpoint"
FORMAT_VERSION = 2  # the newest version read; written: 1, or 2 when a packed layout is present


def _save_shard(tensors: dict[str, torch.Tensor], file: Path, final: Path) -> None:
    """``save_file``, with a failed write (a full disk, a lost mount: safetensors' own error or an
    OSError) raised as one OSError naming the shard file; ``final`` is left as it was."""
    try:
        save_file(tensors, str(file))
    except (SafetensorError, OSError) as err:
        raise OSError(f"could not write checkpoint file {file} ({' '.join(str(err).split())}); {final} is "
                      "left as it was") from err


class CheckpointWriter:
    """Stream tensors into a checkpoint shard by shard (one block at a time), then publish it."""

    def __init__(self, path: str | os.PathLike, *, source: dict, recipe: dict, hf_config: dict,
                 overwrite: bool = False) -> None:
        self.path = Path(path)
        recover(self.path)  # (an old checkpoint a killed run left aside is put back before the check)
        if os.path.lexists(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} exists; choose another output folder or overwrite it "
                                  "(overwrite=True, qnpu quantize --overwrite)")
        self.tmp = staging(self.path)
        self.meta = {"format": FORMAT, "format_version": 1, "qnpu_version": qnpu.__version__,
                     "source": source, "recipe": recipe, "linears": {}, "shards": [], "extra": {}}
        (self.tmp / "config.json").write_text(json.dumps(hf_config, indent=1, default=str))
        self.overwrite = overwrite

    def add(self, tensors: dict[str, torch.Tensor], qlinears: dict[str, dict] | None = None) -> None:
        """Write one shard. ``qlinears`` maps a linear's label to ``{"qweight": QWeight | None,
        "act_spec": QSpec | None, "act_qparams": (scale, zp) | None, "online_hadamard": bool}``;
        with a ``qweight`` the float ``<label>.weight`` must not also be in ``tensors`` (it is
        rebuilt by dequantizing); without one (activation-only quantization) it must be."""
        shard: dict[str, torch.Tensor] = {k: v.detach().contiguous() for k, v in tensors.items()}
        for label, info in (qlinears or {}).items():
            q: QTensor | None = info.get("qweight")
            entry = {"weight_spec": None, "dtype": None}
            if q is not None:
                if f"{label}.weight" in shard:
                    raise ValueError(f"{label}: pass either its quantized weight or its float weight, not both")
            if is_packed(q):
                shard.update({f"{label}.{k}": v.contiguous() for k, v in q.to_tensors().items()})
                entry = {"weight_spec": q.spec.to_dict(), "dtype": str(q.dtype).removeprefix("torch."),
                         "weight_layout": {"kind": q.layout, **q.layout_meta()}}
                self.meta["format_version"] = 2
            elif q is not None:
                shard[f"{label}.codes"] = q.codes.contiguous()
                shard[f"{label}.scale"] = q.scale.contiguous()
                if q.zero_point is not None:
                    shard[f"{label}.zero_point"] = q.zero_point.contiguous()
                entry = {"weight_spec": q.spec.to_dict(), "dtype": str(q.dtype).removeprefix("torch.")}
            entry |= {"act_spec": None if info.get("act_spec") is None else info["act_spec"].to_dict(),
                     "online_hadamard": bool(info.get("online_hadamard", False)), "act_qparams": False}
            if info.get("act_qparams") is not None:
                scale, zp = info["act_qparams"]
                shard[f"{label}.act_scale"] = scale.detach().contiguous()
                if zp is not None:
                    shard[f"{label}.act_zero_point"] = zp.detach().contiguous()
                entry["act_qparams"] = True
            self.meta["linears"][label] = entry
        name = f"shard-{len(self.meta['shards']):05d}.safetensors"
        _save_shard(shard, self.tmp / name, self.path)
        self.meta["shards"].append(name)

    def close(self, extra: dict | None = None, hf_config: dict | None = None) -> Path:
        """Write ``qnpu.json`` and atomically move the folder into place; ``hf_config`` replaces the
        config given at the start (streamed runs know the final one, e.g. untied, only at the end)."""
        self.meta["extra"].update(extra or {})
        if hf_config is not None:
            (self.tmp / "config.json").write_text(json.dumps(hf_config, indent=1, default=str))
        (self.tmp / "qnpu.json").write_text(json.dumps(self.meta, indent=1))
        if os.path.lexists(self.path) and not self.overwrite:
            raise FileExistsError(f"{self.path} appeared while the checkpoint was written; it is left as it was")
        # the old checkpoint is renamed aside, not deleted in place, and put back if the new one does
        # not get into place: the path holds the old checkpoint or the new one, never neither
        return publish(self.tmp, self.path)

    def abort(self) -> None:
        remove(self.tmp)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def damaged(file: Path, problem: str) -> ValueError:
    """The error for a damaged checkpoint: one line naming ``file`` and the problem."""
    return ValueError(f"checkpoint file {file}: {problem}; it is damaged: quantize the model again")


def one_line(err: BaseException, limit: int = 300) -> str:
    """``err``'s message on one line, at most ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise damaged(file, f"not valid JSON ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise damaged(file, f"holds a JSON {type(data).__name__}, not an object")
    return data


# a quantized linear's entry in qnpu.json: key -> the JSON types it may have
_ENTRY = {"weight_spec": (dict, type(None)), "dtype": (str, type(None)), "act_spec": (dict, type(None)),
          "online_hadamard": (bool,), "act_qparams": (bool,)}


def _check_meta(meta: dict, file: Path) -> None:
    """Refuse a ``qnpu.json`` whose structure is not the writer's, naming the key."""
    if meta.get("format") != FORMAT or not isinstance(meta.get("format_version"), int) \
            or meta["format_version"] > FORMAT_VERSION:
        raise ValueError(f"checkpoint file {file}: unsupported checkpoint format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}")
    for key, kind in (("shards", list), ("linears", dict)):
        if not isinstance(meta.get(key), kind):
            raise damaged(file, f"'{key}' is {'missing' if key not in meta else 'not a ' + kind.__name__}")
    if not all(isinstance(s, str) and s for s in meta["shards"]):
        raise damaged(file, "'shards' holds something other than file names")
    for label, entry in meta["linears"].items():
        if not isinstance(entry, dict):
            raise damaged(file, f"quantized linear {label}: its entry is not an object")
        for key, kinds in _ENTRY.items():
            if not isinstance(entry.get(key, ...), kinds):
                raise damaged(file, f"quantized linear {label}: '{key}' is "
                                    f"{'missing' if key not in entry else 'invalid: ' + repr(entry[key])}")
        layout = entry.get("weight_layout")
        if layout is not None and not (isinstance(layout, dict) and layout.get("kind") in PACKED_LAYOUTS
                                       and isinstance(entry["weight_spec"], dict)):
            raise damaged(file, f"quantized linear {label}: 'weight_layout' is invalid: {layout!r} (known kinds: "
                                f"{sorted(PACKED_LAYOUTS)})")


def _has_zero_point(spec: QSpec | None) -> bool:
    """Whether codes of ``spec`` come with a stored zero point (not 0 by construction, as for
    symmetric int and binary)."""
    return spec is not None and spec.format != "binary" and not (spec.symmetric and spec.symmetric_zero == 0)


class Checkpoint:
    """A checkpoint read back: metadata plus float tensors and quantized linears.

    A damaged checkpoint (a file that is not JSON or not safetensors, a key, file or tensor
    missing, an unknown spec or dtype, NaN/Inf values, codes outside their range) is refused with
    a ValueError (a missing file: FileNotFoundError) on one line naming the file, and the tensor or
    linear where there is one. Changes that leave valid values (a different finite weight) cannot be
    detected: the checkpoint has no checksums."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.meta_file = self.path / "qnpu.json"
        if not self.meta_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a qnpu checkpoint (no qnpu.json)")
        self.meta = _read_json(self.meta_file)
        _check_meta(self.meta, self.meta_file)
        self.config_file = self.path / "config.json"
        self.hf_config = _read_json(self.config_file)
        self.tensors: dict[str, torch.Tensor] = {}
        self.files: dict[str, Path] = {}  # tensor name -> the shard holding it (for error messages)
        for shard in self.meta["shards"]:
            file = self.path / shard
            if not file.is_file():
                raise FileNotFoundError(f"checkpoint file {file} (a shard {self.meta_file} lists) is missing; "
                                        "copy it again or quantize the model again")
            try:
                loaded = load_file(str(file))
            except SafetensorError as err:
                raise damaged(file, f"not a readable safetensors file ({one_line(err)})") from None
            for name, t in loaded.items():
                if name in self.files:
                    raise damaged(file, f"tensor {name} is also in {self.files[name]}")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise damaged(file, f"tensor {name} has NaN/Inf values")
            self.tensors.update(loaded)
            self.files.update(dict.fromkeys(loaded, file))

    def _where(self, label: str) -> Path:
        """The shard holding a quantized linear's tensors (qnpu.json when it has none)."""
        names = [f"{label}.{p}" for p in PACKED_SUFFIXES + ("act_scale", "act_zero_point")]
        return next((self.files[n] for n in names if n in self.files), self.meta_file)

    def _spec(self, label: str, key: str) -> QSpec:
        try:
            return QSpec.from_dict(self.meta["linears"][label][key])
        except (ValueError, TypeError) as err:
            raise damaged(self.meta_file, f"quantized linear {label}: {key}: {one_line(err)}") from None

    def _qweight(self, label: str, entry: dict):
        t, spec = self.tensors, self._spec(label, "weight_spec")
        dtype = getattr(torch, str(entry["dtype"]), None)
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise damaged(self.meta_file, f"quantized linear {label}: unknown dtype {entry['dtype']!r}")
        if entry.get("weight_layout") is not None:
            return self._packed(label, entry["weight_layout"], spec, dtype)
        names = [f"{label}.{p}" for p in ("codes", "scale", "zero_point")]
        where = self._where(label)
        lacking = [n for n in (names if _has_zero_point(spec) else names[:2]) if n not in t]
        if lacking:
            raise damaged(where, f"quantized linear {label}: the checkpoint lacks {', '.join(lacking)}")
        zp = t.get(names[2])
        if zp is not None and zp.numel() and spec.zero_point_domain == "int" and (
                zp.is_floating_point() or int(zp.min()) < spec.qmin or int(zp.max()) > spec.qmax):
            raise damaged(where, f"quantized linear {label}: zero_point is outside the {spec.bits}-bit "
                                 f"{spec.format} range [{spec.qmin}, {spec.qmax}]")
        try:
            return QTensor(t[names[0]], t[names[1]], zp, spec, dtype)
        except (ValueError, TypeError, IndexError, RuntimeError) as err:  # codes out of range, NaN or mis-shaped scales
            raise damaged(where, f"quantized linear {label}: {one_line(err)}") from None

    def _packed(self, label: str, layout: dict, spec: QSpec, dtype: torch.dtype):
        """A packed layout's weight (`qnpu.qcore.packed_from_tensors`) from ``label``'s tensors."""
        tensors = {k: self.tensors[f"{label}.{k}"] for k in PACKED_SUFFIXES if f"{label}.{k}" in self.tensors}
        meta = {k: v for k, v in layout.items() if k != "kind"}
        try:
            return packed_from_tensors(layout["kind"], tensors, meta, spec, dtype)
        except (ValueError, TypeError, IndexError, KeyError, RuntimeError) as err:
            raise damaged(self._where(label), f"quantized linear {label} ({layout['kind']} layout): "
                                              f"{one_line(err)}") from None

    def qlinears(self) -> dict[str, dict]:
        """Label -> ``{"qweight": QWeight | None, "act_spec", "act_qparams", "online_hadamard"}``."""
        out = {}
        for label, entry in self.meta["linears"].items():
            q = None if entry["weight_spec"] is None else self._qweight(label, entry)
            act = None if entry["act_spec"] is None else self._spec(label, "act_spec")
            qp = None
            if entry["act_qparams"]:
                scale, zp = self.tensors.get(f"{label}.act_scale"), self.tensors.get(f"{label}.act_zero_point")
                if scale is None or not scale.is_floating_point() or (zp is None and _has_zero_point(act)):
                    lacking = f"{label}.act_scale" if scale is None or not scale.is_floating_point() else \
                        f"{label}.act_zero_point"
                    raise damaged(self._where(label), f"quantized linear {label}: the checkpoint lacks {lacking}")
                qp = (scale, zp)
            out[label] = {"qweight": q, "act_spec": act, "act_qparams": qp,
                          "online_hadamard": entry["online_hadamard"]}
        return out

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that are not part of a quantized linear's encoding."""
        suffixes = tuple(f".{p}" for p in PACKED_SUFFIXES + ("act_scale", "act_zero_point"))
        labels = set(self.meta["linears"])
        return {k: v for k, v in self.tensors.items()
                if not (k.endswith(suffixes) and k.rsplit(".", 1)[0] in labels)}
