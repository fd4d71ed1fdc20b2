"""Rebuild qnpu/data/slices/ (the accuracy protocol's text, docs/architecture.md) from its sources.

Sources:
  docs  Python 3.11 documentation sources from the Debian package python3.11-doc
        (``apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb DIR``; pass
        ``--docs DIR/usr/share/doc/python3.11/html/_sources``);
  code  the top-level ``*.py`` files of the running CPython 3.11's standard library
        (``sysconfig.get_paths()["stdlib"]``, or ``--stdlib DIR``).

Slices (files joined with ``"\\n\\n"``, tokenized by the default model's tokenizer without BOS):
  calibration  library/*.rst.txt sorted by path                      -> first 65,536 tokens
  docs         tutorial/, then faq/, then howto/ (each sorted)       -> first 20,480 tokens
  code         stdlib *.py with int(md5(basename).hexdigest(), 16) % 5 == 0, sorted -> 20,480

Each slice file is the shortest prefix of the joined text that ends at a line end and whose
tokenization starts with exactly the first ``n`` tokens of the whole joined text (checked here
against a tokenization of the full text). ``--check`` rebuilds in memory and compares with the
committed files instead of writing.

Run: .venv/bin/python scripts/build_data_slices.py --docs DIR/usr/share/doc/python3.11/html/_sources
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qnpu.data import MANIFEST_FILE, SLICES_DIR  # noqa: E402
from qnpu.models.default import DEFAULT_MODEL, PIP_COMMAND, load_default_tokenizer  # noqa: E402

JOIN = "\n\n"
SPECS = {  # name -> (protocol token count, file name)
    "calibration": (128 * 512, "calibration.txt"),
    "docs": (40 * 512, "docs.txt"),
    "code": (40 * 512, "code.txt"),
}
DEBIAN_DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def md5_bucket(name: str) -> int:
    return int(hashlib.md5(name.encode("utf-8")).hexdigest(), 16) % 5


def source_files(docs: Path, stdlib: Path) -> dict[str, list[tuple[str, Path]]]:
    """Per slice, the (label, path) list in protocol order; labels are relative to their root."""
    def rel(root, paths, prefix):
        return [(f"{prefix}/{p.relative_to(root).as_posix()}", p) for p in paths]

    library = sorted((docs / "library").glob("*.rst.txt"))
    guides = [p for d in ("tutorial", "faq", "howto") for p in sorted((docs / d).glob("*.rst.txt"))]
    code = sorted(p for p in stdlib.glob("*.py") if md5_bucket(p.name) == 0)
    for name, files in (("library", library), ("tutorial/faq/howto", guides), ("stdlib", code)):
        if not files:
            sys.exit(f"error: no {name} source files found; check --docs / --stdlib")
    return {"calibration": rel(docs, library, "_sources"), "docs": rel(docs, guides, "_sources"),
            "code": rel(stdlib, code, "stdlib")}


def read_source(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if "\r" in text:
        sys.exit(f"error: {path} contains carriage returns; the protocol assumes '\\n' line ends")
    return text


def cut_slice(tokenizer, text: str, n: int) -> tuple[str, list[int], int]:
    """Shortest line-aligned prefix of ``text`` whose first ``n`` tokens equal the full text's."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    full = enc["input_ids"]
    if len(full) < n:
        sys.exit(f"error: the joined sources give only {len(full)} tokens, fewer than {n}")
    cut = enc["offset_mapping"][n - 1][1]
    while True:
        newline = text.find("\n", cut)
        cut = len(text) if newline < 0 else newline + 1
        ids = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
        if ids[:n] == full[:n]:
            return text[:cut], full[:n], len(full)
        if cut == len(text):
            sys.exit("error: no prefix of the text reproduces the full text's tokens")


def debian_version(docs: Path) -> str | None:
    changelog = docs.parents[2] / "python3.11-doc" / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as f:
            first = f.readline()
        return first.split("(", 1)[1].split(")", 1)[0]
    except (OSError, IndexError):
        return None


def token_digest(ids: list[int]) -> str:
    return hashlib.sha256(",".join(map(str, ids)).encode("ascii")).hexdigest()


def build(docs: Path, stdlib: Path, tokenizer) -> tuple[dict, dict[str, bytes]]:
    files = source_files(docs, stdlib)
    deb = debian_version(docs)
    py = sys.version.split()[0]
    descriptions = {
        "calibration": "Python 3.11 docs library/*.rst.txt, sorted by path",
        "docs": "Python 3.11 docs tutorial/*.rst.txt, then faq/*.rst.txt, then howto/*.rst.txt, "
                "each folder sorted",
        "code": "top-level CPython standard library *.py files with int(md5(basename).hexdigest(), 16) "
                "% 5 == 0, sorted by name",
    }
    entries, blobs = {}, {}
    for name, (n, filename) in SPECS.items():
        texts = [read_source(p) for _, p in files[name]]
        joined = JOIN.join(texts)
        text, ids, source_tokens = cut_slice(tokenizer, joined, n)
        starts, pos = [], 0
        for t in texts:
            starts.append(pos)
            pos += len(t) + len(JOIN)
        included = [label for (label, _), s in zip(files[name], starts) if s < len(text)]
        data = text.encode("utf-8")
        entries[name] = {
            "file": filename,
            "source": descriptions[name] + ", joined with '\\n\\n'",
            "origin": (f"Debian python3.11-doc {deb or '(version unknown)'}, "
                       "usr/share/doc/python3.11/html/_sources" if name != "code"
                       else f"CPython {py} standard library ({stdlib})"),
            "n_tokens": n,
            "n_tokens_in_file": len(tokenizer(text, add_special_tokens=False)["input_ids"]),
            "n_chars": len(text),
            "n_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "token_ids_sha256": token_digest(ids),
            "source_files": len(files[name]),
            "source_tokens": source_tokens,
            "files": included,
        }
        blobs[filename] = data
    entries["code"]["note"] = (
        "_sysconfigdata__linux_x86_64-linux-gnu.py is generated per CPython build (this one is "
        f"pyenv's CPython {py} build); another interpreter gives a different code slice, so use "
        "the committed file")
    manifest = {
        "protocol": "DESIGN.md, 'The default model and data'",
        "tokenizer": f"{DEFAULT_MODEL} (from the GGUF of {PIP_COMMAND}), "
                     "tokenizer(text, add_special_tokens=False)",
        "bos": "none: the tokenizer adds no BOS by default and the protocol numbers use none",
        "join": "\\n\\n",
        "window": 512,
        "cut": "each file is the shortest line-aligned prefix of the joined sources whose first "
               "n_tokens tokens equal the first n_tokens tokens of the whole joined text",
        "license": "PSF License Agreement for Python (see README.md and LICENSE-PSF.txt)",
        "slices": entries,
    }
    return manifest, blobs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=Path, default=DEBIAN_DOCS,
                        help="the python3.11-doc _sources folder (default: %(default)s)")
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="CPython 3.11 standard library folder (default: this interpreter's)")
    parser.add_argument("--out", type=Path, default=SLICES_DIR, help="output folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="compare with the files in --out instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    if not (args.docs / "library").is_dir():
        sys.exit(f"error: {args.docs} has no library/ folder; extract python3.11-doc with "
                 "'apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb DIR' and pass "
                 "--docs DIR/usr/share/doc/python3.11/html/_sources")
    if sys.version_info[:2] != (3, 11) and args.stdlib == Path(sysconfig.get_paths()["stdlib"]):
        print(f"warning: running Python {sys.version.split()[0]}, the protocol uses the 3.11 stdlib",
              file=sys.stderr)
    tokenizer = load_default_tokenizer()
    manifest, blobs = build(args.docs, args.stdlib, tokenizer)
    for name, entry in manifest["slices"].items():
        print(f"{name:12s} {entry['n_tokens']:6d} tokens  {entry['n_chars']:7d} chars  "
              f"{len(entry['files']):3d}/{entry['source_files']} files  sha256 {entry['sha256'][:16]}")
    if args.check:
        differ = [f for f, data in blobs.items()
                  if not (args.out / f).is_file() or (args.out / f).read_bytes() != data]
        if differ:
            print(f"differs from {args.out}: {differ}", file=sys.stderr)
            return 1
        print(f"all slices match {args.out}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for filename, data in blobs.items():
        (args.out / filename).write_bytes(data)
    (args.out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    license_src = args.stdlib / "LICENSE.txt"
    if license_src.is_file():
        shutil.copyfile(license_src, args.out / "LICENSE-PSF.txt")
    print(f"wrote {sorted(blobs)} and {MANIFEST_FILE} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
