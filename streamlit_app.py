"""lungviz app entry point: navigation only; each page lives in app_pages/."""

import streamlit as st

from app_pages.session import init_state
from lungviz import RESEARCH_NOTICE

st.set_page_config(page_title="lungviz", page_icon=":material/pulmonology:", layout="wide")
init_state()
pages = [
    st.Page("app_pages/inspect.py", title="Inspect an upload", icon=":material/upload_file:", default=True),
    st.Page("app_pages/library.py", title="Case library", icon=":material/photo_library:"),
    st.Page("app_pages/models.py", title="Models and data", icon=":material/info:"),
    st.Page("app_pages/reviews.py", title="Review log", icon=":material/rate_review:"),
]
page = st.navigation(pages)
st.sidebar.warning(RESEARCH_NOTICE, icon=":material/warning:")
st.markdown(":red-badge[:material/warning: Research and education use only: not a medical device, not for "
            "diagnosis]")
page.run()
