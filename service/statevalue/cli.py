"""The ``statevalue`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin

from pydantic import ValidationError
from pydantic_settings import BaseSettings

from statevalue import __version__
from statevalue.api_models import EstimateOut, GroupIn
from statevalue.config import (
    METHODS,
    EstimatorConfig,
    load_params,
    validation_message,
)
from statevalue.schema import EstimateRequest, InvalidRequest
from statevalue.settings import ModelSettings, ServerSettings

if TYPE_CHECKING:
    from statevalue.backends.base import ModelBackend

INPUT_HELP = """\
input format (JSON lines, one group per line):
  {"group_id": "g1", "prompt_id": "optional-stable-id",
   "prompt_ids": [1, 2, 3],
   "rollouts": [{"response_ids": [4, 5, 6], "reward": 1.0},
                {"response_ids": [7, 8], "reward": 0.0},
                {"response_ids": [9]}]}
  Instead of prompt_ids a group may give "prompt_text" or chat "messages"
  ([{"role": "user", "content": "..."}]) with "response_text" in its rollouts;
  they are tokenised with the model's tokenizer / chat template.
  A rollout without "reward" is a query: it gets values but adds no statistics.
  Groups sharing a "prompt_id" accumulate one Numca table across the file.

output (JSON lines, one group per line, in input order):
  {"model": {"name": ..., "version": ...}, "group_id": "g1",
   "rollouts": [{"values": {"numca": [...], ...}, "advantages": {...},
                 "boundaries": {...}}, ...]}
  values[t] = V(prompt + response[:t]); one float per response token.

example:
  statevalue estimate --input examples/groups.jsonl --output values.jsonl
"""


CALIBRATE_HELP = """\
Find the estimator settings that fit your own rollouts.

From a sample of your groups (the input format of 'statevalue estimate', with rewards),
states (response i, before token t) are drawn at random; from each, the policy model
(--model, as 'statevalue serve' loads it) samples K continuations, your reward function
scores each completed response, and the mean is the state's target value. Then group
mean, Numca and Hista under a grid of settings (Numca: number_pattern x merge_distance;
Hista: node_spacing x relative_d_min; the defaults; the reference settings) value the
same states, and a table shows how close each comes to the targets. The best Numca and
Hista settings go to --out, a params file for 'statevalue serve --params'.

The reward function gets the prompt text (prompt_text, the last user message of
"messages", or the decoded prompt_ids) and the full response text (prefix plus
continuation, special tokens dropped).

Resumable: each finished state's continuation rewards are appended to the work file; a
rerun with the same settings skips them. --budget N stops after N states; the table and
the params file come once every state is done.
"""

CALIBRATE_EPILOG = """\
the table (stdout):
  MAE ± SE             mean |value - target| over the states; SE clustered by prompt
                       (the states of one group share its responses)
  ratio to group mean  MAE / group-mean MAE (below 1: better than GRPO's baseline)
  − group mean ± SE    paired difference of absolute errors, state by state: negative
  − ½ mix ± SE         is better; a difference beyond two SEs is more than noise.
                       The ½ mix values a state at (own reward + group mean) / 2: a
                       trivial estimate that a useful setting should beat.

example:
  cat > myreward.py <<'EOF'
  def reward(prompt: str, response: str) -> float:
      return float(response.strip().endswith("42"))
  EOF
  statevalue calibrate --input rollouts.jsonl --reward myreward:reward --mc 8 \\
      --out params.json
  statevalue serve --params params.json
"""


def parse_params(assignments: Sequence[str]) -> EstimatorConfig:
    """``["hista.d_min=3", "advantage.scale=none"]`` -> a validated EstimatorConfig."""
    tree: dict[str, dict[str, Any]] = {}
    for item in assignments:
        name, sep, raw = item.partition("=")
        section, dot, field = name.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set expects SECTION.FIELD=VALUE, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        tree.setdefault(section, {})[field] = value
    try:
        return EstimatorConfig.model_validate(tree)
    except ValidationError as exc:
        raise ValueError(validation_message(exc)) from exc


def _read_groups(path: Path) -> Iterator[tuple[int, GroupIn]]:
    with path.open() as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, GroupIn.model_validate_json(line)
            except ValidationError as exc:
                raise ValueError(f"{path}:{number}: {validation_message(exc)}") from exc


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_estimate(args: argparse.Namespace) -> int:
    """Estimate values for every group of a JSON-lines file."""
    from tqdm import tqdm

    from statevalue.engine import Engine, check_methods

    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()])
    config = parse_params(args.set)
    defaults = None if args.params is None else load_params(args.params)
    groups = list(_read_groups(args.input))
    if not groups:
        raise ValueError(f"{args.input}: no groups")
    engine = Engine(_loaded_backend(args), defaults=defaults)
    forward = estimator = 0.0
    output = sys.stdout if str(args.output) == "-" else args.output.open("w")
    try:
        with tqdm(total=len(groups), unit="group", disable=args.quiet) as bar:
            for chunk in _chunks(groups, args.batch_groups):
                request = EstimateRequest(
                    groups=[g.to_input() for _, g in chunk], methods=methods, config=config
                )
                try:
                    result = engine.estimate(request)
                except InvalidRequest as exc:
                    # Point at the input line, not the position inside this chunk.
                    match = re.match(r"groups\[(\d+)\]\.?(.*)", exc.field)
                    if match is None:
                        raise ValueError(str(exc)) from exc
                    line = chunk[int(match.group(1))][0]
                    field = match.group(2) or "group"
                    raise ValueError(f"{args.input}:{line}: {field}: {exc.message}") from exc
                forward += result.forward_seconds
                estimator += result.estimator_seconds
                out = EstimateOut.from_result(result)
                for group in out.groups:
                    line = {"model": out.model.model_dump(), **group.model_dump(exclude_none=True)}
                    output.write(json.dumps(line) + "\n")
                bar.update(len(chunk))
    finally:
        if output is not sys.stdout:
            output.close()
    print(
        f"{len(groups)} groups: forward {forward:.2f} s, estimators {estimator:.2f} s",
        file=sys.stderr,
    )
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    """Monte Carlo targets on the user's rollouts, every setting scored, the best written."""
    from statevalue.calibration import MonteCarlo, calibrate, load_reward

    reward = load_reward(args.reward)
    lines = list(_read_groups(args.input))
    if not lines:
        raise ValueError(f"{args.input}: no groups")
    work = args.work or args.out.with_name(args.out.stem + ".work.jsonl")
    report = calibrate(
        # Monte Carlo sampling generates text, which only the torch backend does.
        _loaded_backend(args, backend="torch"),
        [group.to_input() for _, group in lines],
        [f"{args.input}:{number}" for number, _ in lines],
        (args.reward, reward),
        work,
        MonteCarlo(
            states_per_group=args.states_per_group,
            samples=args.mc,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
        ),
        budget=args.budget,
        progress=not args.quiet,
    )
    left = report.states - report.done_before - report.ran
    print(
        f"states: {report.states} in all, {report.done_before} done before (in {work}), "
        f"{report.ran} run now, {left} left",
        file=sys.stderr,
    )
    if not report.complete:
        print("run the same command again to continue", file=sys.stderr)
        return 0
    print(report.text())
    args.out.write_text(json.dumps(report.params, indent=1) + "\n")
    print(f"\nwrote {args.out}: {json.dumps(report.params)}")
    return 0


def _loaded_backend(args: argparse.Namespace, **fixed: Any) -> ModelBackend:
    """The model the command's flags name, or the one :func:`main` was given."""
    if args.loaded_backend is not None:
        return args.loaded_backend
    from statevalue.backends.factory import open_backend

    return open_backend(settings_from_args(ModelSettings, args, **fixed))


def run_serve(args: argparse.Namespace) -> int:
    """Run the gRPC + HTTP server until SIGTERM / SIGINT."""
    import asyncio

    from statevalue.server import serve

    settings = settings_from_args(ServerSettings, args)
    if settings.log_json:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    logging.getLogger(__name__).info("settings %s", settings.model_dump_json())
    asyncio.run(serve(settings))
    # Every answer is sent by now. A normal interpreter exit would first wait for the
    # forward step still running on the model thread (seconds on a CPU), past the grace.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


# Shorter spellings of some settings' flags.
_ALIASES = {"params_file": ("--params",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    settings_class: type[BaseSettings],
    names: Iterable[str] | None = None,
) -> None:
    """A flag for each field of ``settings_class`` (or those ``names``), with its help, env
    variable and default. The flags only carry text: the settings model parses and checks
    every value (:func:`settings_from_args`)."""
    fields = settings_class.model_fields
    prefix = settings_class.model_config.get("env_prefix", "")
    for name in names or fields:
        info = fields[name]
        default = "unset" if info.default is None else repr(info.default)
        help_text = f"{info.description} (default {default}; env {prefix}{name.upper()})"
        flags = (_flag(name), *_ALIASES.get(name, ()))
        if info.annotation in (bool, bool | None):
            parser.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        choices = get_args(info.annotation) if get_origin(info.annotation) is Literal else ()
        metavar = "{" + ",".join(choices) + "}" if choices else name.upper()
        parser.add_argument(*flags, dest=name, metavar=metavar, help=help_text)


_S = TypeVar("_S", bound=BaseSettings)


def settings_from_args(settings_class: type[_S], args: argparse.Namespace, **fixed: Any) -> _S:
    """The settings of the flags given (the environment and defaults fill the rest), checked.

    Raises:
        ValueError: one line naming each bad value's flag.
    """
    given = {
        name: getattr(args, name)
        for name in settings_class.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return settings_class(**given, **fixed)
    except ValidationError as exc:
        raise ValueError(settings_message(exc)) from None


def settings_message(exc: ValidationError) -> str:
    """``--device: must be auto, cpu, cuda or cuda:N, not 'gpu'; ...`` for a failed check."""
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] != "value_error" and error["loc"]:
            message += f", not {error['input']!r}"
        parts.append(f"{_flag(str(error['loc'][0]))}: {message}" if error["loc"] else message)
    return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="statevalue",
        description="Per-token state values (Numca, Hista, group mean) for LLM RL trainers.",
    )
    parser.add_argument("--version", action="version", version=f"statevalue {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    estimate = commands.add_parser(
        "estimate",
        help="estimate values for a JSON-lines file of groups (offline)",
        description="Estimate per-token values and advantages for groups of rollouts.",
        epilog=INPUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    estimate.add_argument("--input", type=Path, required=True, help="JSON-lines file of groups")
    estimate.add_argument(
        "--output", type=Path, default=Path("-"), help="output file (default: stdout)"
    )
    estimate.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    add_settings_arguments(estimate, ModelSettings)
    estimate.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="estimator parameter, e.g. hista.d_min=3.0, numca.number_pattern=decimal, "
        "advantage.scale=none (repeatable)",
    )
    estimate.add_argument(
        "--params",
        type=Path,
        metavar="FILE",
        help="params file (JSON, as 'statevalue calibrate' writes): defaults that --set overrides",
    )
    estimate.add_argument(
        "--batch-groups", type=int, default=8, help="groups per engine call (default 8)"
    )
    estimate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    estimate.set_defaults(handler=run_estimate)

    _add_calibrate_parser(commands)

    serve = commands.add_parser(
        "serve",
        help="run the gRPC + HTTP server",
        description="Serve values over gRPC (trainers) and HTTP (people) on one engine. "
        "Every flag can also be set by its STATEVALUE_* environment variable.",
        epilog="example:\n  statevalue serve --grpc-port 50051 --http-port 8000\n"
        "  curl -s localhost:8000/readyz",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_arguments(serve, ServerSettings)
    serve.set_defaults(handler=run_serve)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _add_calibrate_parser(commands: Any) -> None:
    calibrate = commands.add_parser(
        "calibrate",
        help="find the estimator settings that fit your rollouts (Monte Carlo targets)",
        description=CALIBRATE_HELP,
        epilog=CALIBRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    calibrate.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="FILE",
        help="JSON-lines file of groups with rewards (the format of 'statevalue estimate')",
    )
    calibrate.add_argument(
        "--reward",
        required=True,
        metavar="MODULE:FUNCTION",
        help="reward function, called as function(prompt_text, response_text) -> float; "
        "the current directory is searched first",
    )
    calibrate.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        default=Path("params.json"),
        help="params file to write (default params.json), for 'statevalue serve --params'",
    )
    calibrate.add_argument(
        "--work",
        type=Path,
        metavar="FILE",
        help="work file of finished states, for resuming (default: OUT's name + .work.jsonl)",
    )
    calibrate.add_argument(
        "--states-per-group",
        type=_positive,
        metavar="N",
        default=2,
        help="states drawn per group, each in another response (default 2)",
    )
    calibrate.add_argument(
        "--mc",
        type=_positive,
        default=8,
        metavar="K",
        help="Monte Carlo continuations per state (default 8)",
    )
    calibrate.add_argument(
        "--max-new-tokens",
        type=_positive,
        metavar="N",
        help="the response length limit the rollouts were sampled with: a continuation "
        "from position t adds at most this minus t tokens (default: the longest response)",
    )
    calibrate.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        default=1.0,
        help="sampling temperature, as for the rollouts (default 1.0)",
    )
    calibrate.add_argument(
        "--seed", type=int, default=0, help="seed of the states and their samples (default 0)"
    )
    calibrate.add_argument(
        "--budget",
        type=_positive,
        metavar="N",
        help="run at most N states (N x K continuations) this time; run again for the rest "
        "(default: all)",
    )
    add_settings_arguments(calibrate, ModelSettings, ("model", "device", "dtype", "layer"))
    calibrate.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    calibrate.set_defaults(handler=run_calibrate)


def parse_command_line(
    argv: Sequence[str] | None = None, backend: ModelBackend | None = None
) -> argparse.Namespace:
    """The parsed command line as :func:`main` runs it; ``backend`` is a loaded model."""
    args = build_parser().parse_args(argv)
    # Beside the flags' own names (a settings field called `backend` is a flag).
    args.loaded_backend = backend
    return args


def main(argv: Sequence[str] | None = None, *, backend: ModelBackend | None = None) -> int:
    """Run the command line ``argv``; ``backend`` reuses a loaded model instead of --model."""
    # Models load from local files only: no Hub lookups, whatever a library would try.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_command_line(argv, backend)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return int(args.handler(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"statevalue: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
