"""lungviz: a research and education tool for reviewing lung nodules on CT (not a diagnostic device)."""

__version__ = "0.1.0"

RESEARCH_NOTICE = (
    "Research and education use only. lungviz is not a medical device and must not be used "
    "to diagnose, treat or manage patients."
)
