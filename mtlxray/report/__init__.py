"""Reports on trained models: evaluation, figures, prediction on image files, export, Markdown."""
