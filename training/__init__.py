"""Training side of the pneumonia classifier: data, preprocessing, models, training loop, evaluation."""
