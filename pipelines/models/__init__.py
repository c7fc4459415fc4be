"""The 30-day readmission model: labels from the views, training and evaluation on the frame the
feature store returns, and the model card."""
