# Every evaluation in tables with intervals (report.confidence) and paired comparisons, then
# one self-contained HTML page with the same numbers and figures.


rule summarize:
    input:
        evaluation_runs,
        # their manifests' `group` column: which test images (slides) share a patient or lesion
        datasets=dataset_folders(),
    output:
        csv=report("results/report/robustness.csv", caption="../report/robustness.rst", category="Tables"),
        per_class=report("results/report/per_class.csv", caption="../report/per_class.rst", category="Tables"),
        comparisons=report("results/report/comparisons.csv", caption="../report/comparisons.rst", category="Tables"),
        json="results/report/robustness.json",
    params:
        evaluations=evaluations(),
        defenses=defenses(),
        baselines=mil_baselines(config),  # MHIM-MIL models against their base model
        statistics=COMPARISON_SETTINGS,
        code=code_fingerprint("report.summary", "evaluate", "data.manifest"),  # intervals: evaluate.statistics; groups: Manifest.groups
    log:
        "logs/summarize.log",
    benchmark:
        "benchmarks/summarize.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/summarize.py"


rule report:
    input:
        unpack(report_inputs),
        summary=rules.summarize.output.json,
        cv=cv_results(),  # known before any download, so a dry run lists the fold jobs
        # apart from report_inputs, which waits for the downloads: planned from the config alone
        slide_robustness=slide_robustness_runs(),
    output:
        html=report("results/report/index.html", caption="../report/index.rst", category="Report"),
        tables=report("results/report/defense_tables.csv", caption="../report/defense_tables.rst", category="Tables"),
        slide_comparisons=report("results/report/slide_comparisons.csv", caption="../report/slide_comparisons.rst", category="Tables"),
        figures=report(
            directory("results/report/figures"),
            patterns=["{figure}.png"],
            caption="../report/figures.rst",
            category="Figures",
            labels={"figure": "{figure}"},
        ),
    params:
        evaluations=evaluations(),
        models=trained_models(),
        heatmaps=plan.fourier_heatmap_tables(config),
        settings={
            "n_examples": config["report"]["n_examples"],
            "small_test_set": config["report"]["small_test_set"],
        },
        config=config,
        repository=workflow.basedir,
        code=code_fingerprint("report", "evaluate"),  # the intervals come from evaluate.statistics
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv",
    conda:
        "../../envs/medrobust.yaml"
    script:
        "../scripts/report.py"
