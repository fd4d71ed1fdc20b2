"""Perplexity on a user's text (`qnpu eval --text FILE` / `--text-dir DIR`), with the protocol of
:mod:`qnpu.eval.perplexity`.

Each file is read as UTF-8 and tokenized on its own without special tokens (no BOS), cut into
non-overlapping windows of 512 tokens; its ``N mod 512`` trailing tokens are dropped and no context
crosses a window or a file boundary. A file's perplexity is over its windows; the corpus's is
prediction-weighted over all windows of all files::

    nll = sum_f nll_f * n_predictions_f / sum_f n_predictions_f,      ppl = exp(nll)

``--text-dir DIR`` takes every ``*.txt`` file under DIR (recursively, sorted by path, hidden files
and folders left out). ``max_tokens`` (``--eval-tokens``) keeps the first tokens of each file.
Files shorter than one window give no prediction: they are listed under ``skipped`` (an error if
no file has a full window). A file that is not UTF-8 is an error naming it and the byte offset,
unless ``skip_bad``: then it is skipped and listed.
"""
from __future__ import annotations

from pathlib import Path

import torch

from qnpu.eval.perplexity import WINDOW, perplexity, ppl_of


class TextError(ValueError):
    """A text file or folder that cannot be evaluated."""


def text_files(text: str | Path | None = None, text_dir: str | Path | None = None) -> list[Path]:
    """The files of ``--text FILE`` or ``--text-dir DIR`` (exactly one of them)."""
    if (text is None) == (text_dir is None):
        raise TextError("give one of --text FILE and --text-dir DIR")
    if text is not None:
        path = Path(text)
        if not path.exists():
            raise TextError(f"--text {path} does not exist; pass a UTF-8 text file")
        if not path.is_file():
            raise TextError(f"--text {path} is not a file (for a folder of .txt files use --text-dir)")
        return [path]
    folder = Path(text_dir)
    if not folder.is_dir():
        raise TextError(f"--text-dir {folder} " + ("is not a folder" if folder.exists() else "does not exist"))
    files = sorted(p for p in folder.rglob("*.txt")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise TextError(f"--text-dir {folder} holds no *.txt files")
    return files


def read_texts(files: list[Path], *, skip_bad: bool = False) -> tuple[list[tuple[Path, str]], list[dict]]:
    """``([(path, text)], skipped)``: the files decoded as UTF-8; undecodable ones raise, or are
    skipped with ``skip_bad``."""
    texts, skipped = [], []
    for path in files:
        try:
            texts.append((path, path.read_bytes().decode("utf-8")))
        except UnicodeDecodeError as err:
            reason = f"not UTF-8 (byte {err.object[err.start]:#04x} at offset {err.start})"
            if not skip_bad:
                raise TextError(f"{path} is {reason}; convert it to UTF-8, or pass --skip-bad to leave it out") \
                    from None
            skipped.append({"path": str(path), "reason": reason})
        except OSError as err:
            raise TextError(f"{path} cannot be read: {err.strerror or err}") from None
    return texts, skipped


def text_perplexity(model, tokenizer, texts: list[tuple[Path, str]], *, max_tokens: int | None = None,
                    window: int = WINDOW, progress: bool = True, skipped: list[dict] | None = None) -> dict:
    """Per-file and corpus perplexity (see the module docstring)."""
    rows, skipped = [], list(skipped or [])
    total = count = 0.0
    for path, text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if len(ids) < window:
            skipped.append({"path": str(path), "reason": f"{len(ids)} tokens, fewer than one window of {window}"})
            continue
        result = perplexity(model, torch.tensor(ids, dtype=torch.long), window, progress=progress)
        rows.append({"path": str(path), "tokens": len(ids), **result})
        total += result["nll"] * result["n_predictions"]
        count += result["n_predictions"]
    if not rows:
        raise TextError(f"no text has a full window of {window} tokens with this tokenizer; give more text")
    nll = total / count
    return {"ppl": ppl_of(nll), "nll": nll, "files": rows, "n_files": len(rows), "skipped": skipped,
            "n_windows": sum(r["n_windows"] for r in rows), "n_predictions": int(count), "window": window}
