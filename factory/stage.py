"""The stage contract: what every stage, data stage or trainer, declares and does.

A stage is one module exposing one ``STAGE`` object (an instance of a ``Stage`` subclass). It
declares

- ``name``: what ``stages = [...]`` in a config calls it, and ``section``: the attribute of the
  run config that holds its own settings (``cfg.critique``, ``cfg.rm``...);
- ``user_files(cfg)``: the files *the config names* that it reads (seed files, principle files,
  prompt files...): they must exist, and their hashes go in the manifest;
- ``needs(cfg, layout)``: the run files it reads (named through the run layout), each with what
  to do when it is missing; ``writes(cfg, layout)``: the run files and folders it makes;
- ``check(cfg)``: validates its own user files (file:line errors) before any model loads;
- ``run(ctx)``: the work, given a ``Context`` (this round's config and layout, the models, echo).

The pipeline derives the start-up check from these declarations alone: every user file exists
and passes ``check``, and every needed run file either exists or is written by a stage earlier
in the run's list. Adding a stage is one module with its ``STAGE`` and one entry in
``pipeline.STAGES``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

if TYPE_CHECKING:  # the contract names them; importing them here would import the world
    from factory.config import RunConfig
    from factory.layout import RunLayout
    from factory.llm.base import Backend

Role = Literal["generator", "judge"]
"""who a stage asks: the generator (the configured model, then each round's policy) or the judge
(always the configured model: ``judge.backend``, else ``backend.spec``)"""


@dataclass(frozen=True)
class Need:
    """A run file (or model folder) a stage reads, and what to say when it is missing."""

    path: Path
    why: str
    """what is missing, from the stage's side: "no prompts to critique\""""
    fix: str
    """how to get it: "run instances first, or set critique.prompts\""""
    folder: bool = False
    """a folder (a trained model), not a file"""

    def there(self) -> bool:
        return self.path.is_dir() if self.folder else self.path.is_file()

    def message(self) -> str:
        return f"{self.path}: {self.why}; {self.fix}"


@dataclass
class Context:
    """What a stage's ``run`` is given: this round's config and layout, its models, and ``echo``."""

    cfg: "RunConfig"
    layout: "RunLayout"
    models: Callable[[Role, bool], "Backend"] = field(repr=False)
    """``models(role, lazy)``: the backend of ``role``; ``lazy=True`` loads it only on its first
    call (a stage that asks two models in turn never holds two engines at once)"""
    echo: Callable[[str], None] = print
    specs: dict = field(default_factory=dict)
    """the spec of each role's backend this round (``{"generator": ..., "judge": ...}``)"""
    load: "Callable[[str], Backend] | None" = field(default=None, repr=False)
    """``load(spec)``: any other model's backend, from the same pool (loading an engine lets the
    live one go); the heldout stage answers with each trained model this way"""
    release: "Callable[[], None] | None" = field(default=None, repr=False)
    """let every loaded backend go (before a stage loads models of its own with torch)"""

    def model(self, role: Role = "generator", lazy: bool = False) -> "Backend":
        return self.models(role, lazy)


class Stage:
    """The base of every stage object; the defaults fit a stage that reads nothing."""

    name: ClassVar[str]
    section: ClassVar[str]
    trains: ClassVar[bool] = False
    """a trainer: every engine is let go before it runs, and its memory after"""
    first_round_only: ClassVar[bool] = False
    """makes the tasks: later rounds reuse round 1's (the prompts stay, the answers change)"""

    def settings(self, cfg: "RunConfig") -> Any:
        return getattr(cfg, self.section)

    def roles(self, cfg: "RunConfig") -> tuple[Role, ...]:
        """the models this stage asks, in the order it asks them (none for a trainer)"""
        return ()

    def user_files(self, cfg: "RunConfig") -> list[Path]:
        return []

    def needs(self, cfg: "RunConfig", layout: "RunLayout") -> list[Need]:
        return []

    def writes(self, cfg: "RunConfig", layout: "RunLayout") -> list[Path]:
        return []

    def check(self, cfg: "RunConfig") -> None:
        """Validate the user files this stage reads; raise with file:line on the first error."""

    def run(self, ctx: Context) -> Any:
        raise NotImplementedError
