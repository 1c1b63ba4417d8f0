"""lungviz app entry point: navigation only; each page lives in app_pages/."""

import streamlit as st

from lungviz import RESEARCH_NOTICE

st.set_page_config(page_title="lungviz", page_icon=":material/pulmonology:", layout="wide")

pages = [
    st.Page("app_pages/models.py", title="Models and data", icon=":material/info:", default=True),
]
st.sidebar.warning(RESEARCH_NOTICE, icon=":material/warning:")
st.navigation(pages).run()
