"""What a clinician reads: the report (HTML, PDF, DICOM SR and SEG), the installed models and the display-safe text."""
