from medrobust.logs import script_logging
from medrobust.slide_groups import link_group_member

with script_logging(snakemake):
    for path in snakemake.output:
        link_group_member(snakemake.input[0], path, snakemake.log[0])
