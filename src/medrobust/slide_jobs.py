"""The per-slide jobs: `python -m medrobust.slide_jobs tile_slide|extract_features ...`.

The rules `tile_slide` and `extract_features` run one job per slide, and run it
through `shell:` with this command rather than through `script:` like every
other rule: Snakemake looks up a rule's script for each job while it plans,
which was about 40 % of what planning a cohort one slide per job cost medrobust
over a bare workflow (docs/benchmarks.md, "Planning without per-job scripts").
The command runs the Python a script would (workflow/rules/common.smk,
`slide_job_command`). What a script would take from its
`snakemake` object comes as arguments: the rule's `job` param (JSON), its
files, threads and log, and the feature loader's speed settings from the rule's
resources (so that tuning them reruns nothing). Few arguments, because
Snakemake formats each job's command while it plans, too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m medrobust.slide_jobs", description=__doc__)
    jobs = parser.add_subparsers(dest="rule", required=True)

    tile = jobs.add_parser("tile_slide", help="cut one slide into its tile store and QC picture")
    tile.add_argument("job", type=json.loads,
                      help='JSON: {"slide": manifest row, "tiling": config, "on_bad_input": ...}')
    tile.add_argument("slides_folder", help="the downloaded dataset (its manifest's folder)")
    tile.add_argument("--tiles", required=True, help="the tile store to write")
    tile.add_argument("--qc", required=True, help="the QC picture to write")
    tile.add_argument("--workers", required=True, type=int, help="reader threads")

    embed = jobs.add_parser("extract_features", help="embed one slide's tiles")
    embed.add_argument("job", type=json.loads,
                       help='JSON: {"features": config without the loader settings, "device": ...}')
    embed.add_argument("tiles", help="the slide's tile store")
    embed.add_argument("--features", required=True, help="the feature store to write")
    embed.add_argument("--loader-workers", required=True, type=int)
    embed.add_argument("--prefetch-batches", required=True, type=int)
    embed.add_argument("--threads", required=True, type=int, help="the job's CPU threads")

    for job in (tile, embed):
        job.add_argument("--log", required=True,
                         help="the rule's log file, logs/<rule>/<wildcard values>.log")
    return parser


def tile_slide_job(args: argparse.Namespace) -> None:
    from medrobust.preprocess.tiling import TilingConfig, tile_slide

    slide = args.job["slide"]
    tile_slide(Path(args.slides_folder) / slide["path"], args.tiles,
               TilingConfig.from_mapping(args.job["tiling"]), slide_id=slide["slide_id"],
               label=slide["label"], split=slide["split"], source_sha256=slide["sha256"],
               workers=args.workers, qc_path=args.qc, on_bad_input=args.job["on_bad_input"])


def extract_features_job(args: argparse.Namespace) -> None:
    from medrobust.config import FEATURE_LOADER_KEYS
    from medrobust.device import select_device
    from medrobust.features.extract import FeatureConfig, extract_slide_features

    loader = {key: getattr(args, key) for key in FEATURE_LOADER_KEYS}
    config = FeatureConfig.from_mapping({**args.job["features"], **loader})
    extract_slide_features(args.tiles, args.features, config,
                           device=select_device(args.job["device"], threads=args.threads))


JOBS = {"tile_slide": tile_slide_job, "extract_features": extract_features_job}


def job_name(rule: str, log: str) -> str:
    """'tile_slide cohort/slide_001' from logs/tile_slide/cohort/slide_001.log: what
    `medrobust.logs.describe_job` makes of a script's rule and wildcards."""
    parts = Path(log).with_suffix("").parts
    starts = [index for index in range(1, len(parts) - 1)
              if parts[index - 1:index + 1] == ("logs", rule)]
    if not starts:
        return rule
    return f"{rule} {'/'.join(parts[starts[-1] + 1:])}"


def main(argv: list[str] | None = None) -> None:
    from medrobust.logs import job_logging

    args = _parser().parse_args(argv)
    with job_logging(args.log, job_name(args.rule, args.log)):
        JOBS[args.rule](args)


if __name__ == "__main__":
    sys.exit(main())
