"""Quantized checkpoints: integer codes, scales, specs, recipe and provenance, bit-exact on reload.

Layout of a checkpoint folder::

    qnpu.json                     format version, qnpu version, source model identity, recipe,
                                  and per quantized linear: weight/activation specs, static
                                  activation qparams keys, online Hadamard flag
    config.json                   the source model's Hugging Face config
    shard-00000.safetensors ...   tensors; a quantized linear ``L`` stores ``L.codes``,
                                  ``L.scale`` and (asymmetric) ``L.zero_point`` instead of
                                  ``L.weight``; everything else is stored as is

A `CheckpointWriter` writes into ``<path>.partial-<pid>`` and renames it to ``path`` only in
`CheckpointWriter.close`, so an interrupted run never leaves a half-written checkpoint at ``path``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import qnpu
from qnpu.qcore import QSpec, QTensor

FORMAT = "qnpu-checkpoint"
FORMAT_VERSION = 1


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
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; choose another output folder or overwrite it "
                                  "(overwrite=True, qnpu quantize --overwrite)")
        self.tmp = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "qnpu_version": qnpu.__version__,
                     "source": source, "recipe": recipe, "linears": {}, "shards": [], "extra": {}}
        (self.tmp / "config.json").write_text(json.dumps(hf_config, indent=1, default=str))
        self.overwrite = overwrite

    def add(self, tensors: dict[str, torch.Tensor], qlinears: dict[str, dict] | None = None) -> None:
        """Write one shard. ``qlinears`` maps a linear's label to ``{"qweight": QTensor | None,
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
        if self.path.exists() and self.overwrite:
            # the old checkpoint is renamed aside, not deleted in place: an interrupt never leaves a
            # half-deleted folder at the path (at worst the path is briefly empty, both copies kept)
            old = self.path.with_name(f"{self.path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class Checkpoint:
    """A checkpoint read back: metadata plus float tensors and quantized linears."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / "qnpu.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.path} is not a qnpu checkpoint (no qnpu.json)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{self.path}: unsupported checkpoint format {self.meta.get('format')!r} "
                             f"version {self.meta.get('format_version')}")
        self.hf_config = json.loads((self.path / "config.json").read_text())
        self.tensors: dict[str, torch.Tensor] = {}
        self.files: dict[str, Path] = {}  # tensor name -> the shard holding it (for error messages)
        for shard in self.meta["shards"]:
            loaded = load_file(str(self.path / shard))
            self.tensors.update(loaded)
            self.files.update(dict.fromkeys(loaded, self.path / shard))

    def qlinears(self) -> dict[str, dict]:
        """Label -> ``{"qweight": QTensor | None, "act_spec", "act_qparams", "online_hadamard"}``."""
        out = {}
        for label, entry in self.meta["linears"].items():
            t = self.tensors
            q = None
            if entry["weight_spec"] is not None:
                spec = QSpec.from_dict(entry["weight_spec"])
                names = [f"{label}.{p}" for p in ("codes", "scale", "zero_point")]
                where = next((self.files[n] for n in names if n in self.files), self.path)
                lacking = [n for n in names[:2] if n not in t]
                if lacking:
                    raise ValueError(f"checkpoint file {where}: quantized linear {label}: the checkpoint lacks "
                                     f"{', '.join(lacking)}; it is damaged: quantize the model again")
                try:
                    q = QTensor(t[names[0]], t[names[1]], t.get(names[2]), spec, getattr(torch, entry["dtype"]))
                except ValueError as err:  # e.g. codes outside the spec's range, NaN scales
                    raise ValueError(f"checkpoint file {where}: quantized linear {label}: {err}; it is damaged: "
                                     "quantize the model again") from None
            act = None if entry["act_spec"] is None else QSpec.from_dict(entry["act_spec"])
            qp = (t[f"{label}.act_scale"], t.get(f"{label}.act_zero_point")) if entry["act_qparams"] else None
            out[label] = {"qweight": q, "act_spec": act, "act_qparams": qp,
                          "online_hadamard": entry["online_hadamard"]}
        return out

    def float_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that are not part of a quantized linear's encoding."""
        suffixes = (".codes", ".scale", ".zero_point", ".act_scale", ".act_zero_point")
        labels = set(self.meta["linears"])
        return {k: v for k, v in self.tensors.items()
                if not (k.endswith(suffixes) and k.rsplit(".", 1)[0] in labels)}
