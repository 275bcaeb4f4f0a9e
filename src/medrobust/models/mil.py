"""Multiple-instance (slide) classifiers; placeholder until ABMIL lands here."""
