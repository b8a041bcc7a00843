"""``ldcq …`` entry point: parses and dispatches; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import sys

from ldcq.errors import LdcqError


def _data_generate(args: argparse.Namespace) -> None:
    from ldcq.data import pointmaze

    dataset_id = pointmaze.generate_dataset(
        args.name, steps=args.steps, seed=args.seed, overwrite=args.overwrite
    )
    print(f"wrote {dataset_id}")


def _data_show(args: argparse.Namespace) -> None:
    from ldcq.data.minari_io import read_episodes

    episodes = read_episodes(args.dataset_id)
    lengths = episodes.lengths
    print(
        f"{episodes.dataset_id}: {episodes.num_episodes} episodes, {int(lengths.sum())} steps "
        f"(episode length {int(lengths.min())}–{int(lengths.max())}), S={episodes.state_dim}, "
        f"A={episodes.action_dim}, ref scores {episodes.ref_min_score} / {episodes.ref_max_score}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldcq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="generate and inspect Minari datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    gen = data_commands.add_parser(
        "generate", help="generate a PointMaze dataset with the D4RL maze2d recipe"
    )
    gen.add_argument("name", help="e.g. pointmaze-umaze, pointmaze-large-dense")
    gen.add_argument("--steps", type=int, default=None, help="env steps (default: D4RL's size)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    gen.set_defaults(func=_data_generate)
    show = data_commands.add_parser("show", help="summarize a dataset as ldcq reads it")
    show.add_argument("dataset_id", help="a Minari id or a generated name")
    show.set_defaults(func=_data_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LdcqError as exc:
        print(f"ldcq: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
