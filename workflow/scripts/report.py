from medrobust.logs import script_logging
from medrobust.report.html import write_report

with script_logging(snakemake):
    write_report(
        snakemake.input.summary,
        snakemake.output.html,
        clean_stores=list(snakemake.input.clean),
        adversarial_stores=list(snakemake.input.adversarial),
        n_examples=snakemake.params.n_examples,
        config=snakemake.params.config,
    )
