"""Review log: every saved verdict (agree / disagree / unsure) with its note, filterable and exportable as CSV."""

import streamlit as st

from app_pages import common
from lungviz.errors import LungvizError
from lungviz.reviews import SOURCES, VERDICTS, summary_headline

st.title("Review log")
store = common.review_store()
if store is None:
    st.stop()
st.caption(f"Stored in {store.path} (set LUNGVIZ_HOME to keep it elsewhere). Add reviews on the inspect and case "
           "library pages.")

with st.container(border=True):
    c1, c2, c3, c4, c5 = st.columns(5)
    verdict = c1.selectbox("Verdict", ["all", *VERDICTS], key="rev-verdict")
    source = c2.selectbox("Case source", ["all", *SOURCES], key="rev-source",
                          format_func=lambda s: {"upload": "uploads", "library": "library cases"}.get(s, s))
    case_query = c3.text_input("Case contains", key="rev-case")
    reviewer = c4.text_input("Reviewer contains", key="rev-reviewer", help="Part of the name, in any case.")
    since = c5.date_input("Since (UTC)", value=None, key="rev-since")
filters = {"verdict": None if verdict == "all" else verdict, "source": None if source == "all" else source,
           "case_query": case_query or None, "reviewer": reviewer or None, "since": since}

try:
    counts = store.counts_by_verdict(**{k: v for k, v in filters.items() if k != "verdict"})
    rows = store.list(**filters)
except LungvizError as err:
    st.error(str(err), icon=":material/error:")
    st.stop()
m = st.columns(4)
m[0].metric("Shown", len(rows))
for col, v in zip(m[1:], VERDICTS, strict=True):
    col.metric(common.VERDICT_LABELS[v], counts[v], help="Reviews matching the other filters, whatever the verdict "
                                                         "filter shows.")
if not rows:
    st.info("No reviews match these filters yet.")
else:
    headlines = [summary_headline(r["model_summary"]) for r in rows]  # a damaged summary reads as none
    st.dataframe(
        [{"when (UTC)": r["created_utc"][:16].replace("T", " "), "case": r["case_id"], "source": r["source"],
          "verdict": r["verdict"], "note": r["note"], "reviewer": r["reviewer"],
          "model: malignant": common.percent(p), "model flag": flag or "-"}
         for r, (p, flag) in zip(rows, headlines, strict=True)],
        hide_index=True, width="stretch",
    )
st.download_button("Download as CSV", lambda: store.to_csv_text(**filters), file_name="lungviz-reviews.csv",
                   mime="text/csv", icon=":material/download:", disabled=not rows, key="rev-csv",
                   on_click="ignore")
