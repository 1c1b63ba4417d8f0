"""Models and data: which model bundles are installed and where the data folder is."""

import streamlit as st

from lungviz import paths
from lungviz.inventory import data_status, installed_models

st.title("Models and data")

status = data_status()
st.subheader("Data folder")
st.code(str(status.folder))
if not status.exists:
    st.error(f"The data folder {status.folder} does not exist. Set LUNGVIZ_DATA to the folder holding lidc-slices/.")
else:
    cols = st.columns(3)
    cols[0].metric("LIDC patients (slices set)", status.lidc_slices_patients)
    cols[1].metric("LIDC DICOM series", status.lidc_dicom_series)
    cols[2].metric("Chest CT histology images", status.histology_images)
    if not status.lidc_labels:
        st.warning("lidc-slices/labels.csv was not found: the case library cannot be labelled.")

st.subheader("Installed models")
models = installed_models()
st.caption(f"Weights folder: {paths.weights_dir()}")
if not models:
    st.info("No trained model bundles are installed yet.")
else:
    st.dataframe(
        [{"model": m["_file"].removesuffix(".json"), "view": m.get("view"), "task": m.get("task"),
          "architecture": m.get("arch"), "input size": m.get("input_size"),
          "weights present": m["_weights_present"]} for m in models],
        hide_index=True,
    )
