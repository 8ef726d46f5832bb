"""sample (AIF): k pool models answer each prompt."""
