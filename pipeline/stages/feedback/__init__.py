"""feedback (AIF): the rater scores every answer; ratings become chosen/rejected pairs."""
