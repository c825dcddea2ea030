"""Publishing a multi-tenant model: its model card, and `push_to_hub` that keeps that card.

transformers' own `push_to_hub` replaces README.md with a generic card; a multi-tenant checkpoint
needs one that names its tenants (as `base_model` metadata), its pool and what sharing saved.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, HTTPError  # HTTPError: the HTTP client's base error

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TAGS = ["multimoe", "mixture-of-experts", "multi-tenant"]  # and the family's model type


def model_card(model, name: str | None = None) -> str:
    """README.md text: YAML metadata, tenants, pool sizes, memory, and quality when measured."""
    config = model.config
    stem = config.family.class_stem
    name = name or f"multi-tenant {stem}"
    sources = [spec.get("source") or "" for spec in config.tenants.values()]
    base_models = sorted({source for source in sources if HUB_ID.match(source) and not os.path.exists(source)})
    tags = [TAGS[0], config.family.model_type, *TAGS[1:]]
    metadata = ModelCardData(library_name="transformers", base_model=base_models or None, tags=tags)
    rows = [
        f"| `{tenant}` | {spec.get('source') or '-'} | {'yes' if spec.get('tie_word_embeddings') else 'no'} | "
        f"{tokenizer_kind(model, tenant)} | {delta_kind(spec)} |"
        for tenant, spec in config.tenants.items()
    ]
    sections = [
        f"---\n{metadata.to_yaml()}\n---",
        f"# {name}: {len(config.tenants)} {stem} tenants, one shared expert pool",
        "Made with the `multimoe` library: each layer's experts are stored once in a shared pool; every tenant "
        "keeps its own attention, norms, router, embeddings and lm_head.",
        "## Tenants\n\n| tenant | source | lm_head tied | tokenizer | low-rank expert deltas |\n|---|---|---|---|---|\n"
        + "\n".join(rows),
        f"Default tenant: `{config.default_tenant}`.",
        "## Pool\n\nExperts stored per layer: " + ", ".join(str(size) for size in config.pool_sizes)
        + f" (0: a dense layer; each tenant has {config.num_routed_experts} per sparse layer).",
        "## Memory\n\n" + model.memory_report().to_markdown(),
    ]
    report = getattr(model, "consolidation_report", None)
    if report is not None:
        sections.append("## Consolidation and quality\n\n" + report.to_markdown())
    auto = "AutoModelForSeq2SeqLM" if config.family.is_encoder_decoder else "AutoModelForCausalLM"
    sections.append(
        f"## Use\n\n```python\nfrom transformers import {auto}\n\n"
        f"model = {auto}.from_pretrained(REPO, trust_remote_code=True)  # or `import multimoe` first\n"
        f'model.set_active_model("{config.default_tenant}")\n'
        'out = model.generate(**inputs, tenant_names=[...])  # or one tenant per row\n```'
    )
    return "\n\n".join(sections) + "\n"


def delta_kind(spec: dict) -> str:
    """How many of the tenant's experts keep a low-rank delta, and of which ranks."""
    ranks = [rank for row in spec.get("delta_ranks") or [] for rank in row if rank]
    if not ranks:
        return "none"
    spread = f"{min(ranks)}-{max(ranks)}" if min(ranks) != max(ranks) else f"{ranks[0]}"
    return f"{len(ranks)} experts, rank {spread}"


def tokenizer_kind(model, tenant: str) -> str:
    """Whether the tenant brings its own tokenizer (in `tenants/<name>/`) and chat template."""
    tokenizer = model.tenant_tokenizers.get(tenant)
    if tokenizer is None:
        return "shared"
    return "own, with a chat template" if tokenizer.chat_template else "own"


def write_model_card(model, directory: str | os.PathLike, name: str) -> None:
    Path(directory, "README.md").write_text(model_card(model, name=name))


@contextmanager
def reaching_the_hub(api: HfApi, step: str):
    """A Hub that cannot be reached (refused, DNS, timeout, proxy) surfaces as the HTTP client's own
    error many frames deep; say instead which step failed, and where. The Hub's own answers
    (`HfHubHTTPError`: credentials, names, quotas) already say why, and pass as they are."""
    try:
        yield
    except HfHubHTTPError:
        raise
    except HTTPError as error:
        raise ConnectionError(
            f"push_to_hub could not reach the Hugging Face Hub at {api.endpoint} to {step} "
            f"({type(error).__name__}: {error}); check the network connection, or HF_ENDPOINT."
        ) from error


def push_to_hub(
    model,
    repo_id: str,
    *,
    tokenizer=None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    max_shard_size: int | str = "5GB",
):
    """Save the model (weights, config with the maps, remote code, each tenant's own files, model
    card) and the shared tokenizer when given into one folder, and upload it as one commit."""
    api = HfApi(token=token)
    with reaching_the_hub(api, f"create the repo {repo_id!r}"):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder, repo_id.split("/")[-1])
        model.save_pretrained(staged, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staged)
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(staged).as_posix(), path_or_fileobj=str(path))
            for path in sorted(staged.rglob("*"))
            if path.is_file()
        ]
        with reaching_the_hub(api, f"upload to {repo_id!r}"):
            return api.create_commit(
                repo_id=repo_id,
                operations=operations,
                commit_message=commit_message or f"Upload multi-tenant model ({', '.join(model.tenants)})",
                revision=revision,
                create_pr=create_pr,
            )


__all__ = ["model_card", "push_to_hub", "write_model_card"]
