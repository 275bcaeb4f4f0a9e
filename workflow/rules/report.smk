# All metrics in one table, and one self-contained HTML page.


rule summarize:
    input:
        all_metrics,
    output:
        csv=report("results/report/robustness.csv", caption="../report/robustness.rst", category="Robustness"),
        json="results/report/robustness.json",
    log:
        "logs/summarize.log",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/summarize.py"


rule report:
    input:
        unpack(report_images),
        summary=rules.summarize.output.csv,
    output:
        html=report("results/report/index.html", caption="../report/index.rst", category="Robustness"),
    params:
        n_examples=config["report"]["n_examples"],
        config=config,
    log:
        "logs/report.log",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/report.py"
