"""The run's report: KLOM, accuracies, MIA and cost of every unlearning method on every forget set, as tables and
plots. `evaluate` reads the stores and computes the metrics, `plots` draws them, `markdown` writes report.md; the
package reads a run's stores and never imports a stage."""

from pipelines.report.markdown import build_report

__all__ = ["build_report"]
