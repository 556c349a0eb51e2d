"""Model card and Hugging Face Hub publishing (being written: see issue 4)."""

from __future__ import annotations


def check_hub_access(repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Fail fast, before training: the token authenticates and `repo_id` exists or can be created with write
    access. Returns the repo id. Raises ValueError with what to do."""
    raise NotImplementedError


def write_model_card(output_dir: str, *, repo_id: str | None = None) -> str:
    """Render model_card_template.md from OUTPUT's own files into OUTPUT/README.md; returns the path."""
    return ""


def push_output_dir(output_dir: str, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Upload the finished output folder in one commit; returns the commit URL."""
    raise NotImplementedError
