# medrobust: how robust is a medical image classifier, and does a defense help?
# Stages: download -> preprocess -> features -> train -> attack / perturb
#         -> evaluate -> report. Each stage's rules live in workflow/rules/.

from snakemake.utils import min_version

min_version("9.0")


# A config given with --configfile replaces this default rather than being
# merged into it, which would keep the default's datasets and models.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/attack.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output.html,
    default_target: True


onsuccess:
    # only when this run made or confirmed the report, not after `snakemake some/target`
    if report_is_current():
        print(f"medrobust report: {REPORT_HTML}")
