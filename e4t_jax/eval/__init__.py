"""Evaluation: the digits reader (digits.py), CLIP-I / CLIP-T (clip_score.py), face identity and
face masks (faces.py, the ``faces`` extra)."""
