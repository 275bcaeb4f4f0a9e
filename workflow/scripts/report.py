from medrobust.logs import script_logging
from medrobust.report.page import write_report

with script_logging(snakemake):
    write_report(
        snakemake.input.summary,
        snakemake.output.html,
        snakemake.output.figures,
        snakemake.output.tables,
        evaluations=snakemake.params.evaluations,
        models=snakemake.params.models,
        datasets=list(snakemake.input.datasets),
        settings=snakemake.params.settings,
        config=snakemake.params.config,
        repository=snakemake.params.repository,
        tile_indexes=list(snakemake.input.tile_indexes),
        cv_results=list(snakemake.input.cv),
        heatmaps=snakemake.params.heatmaps,
        lesion_folders=list(snakemake.input.lesion_visibility),
        slide_robustness_folders=list(snakemake.input.slide_robustness),
        attention_runs=list(snakemake.input.attention),
        slide_comparisons_csv=snakemake.output.slide_comparisons,
    )
