"""The servers `bench/serving.py` measures ours against, as the files it launches."""
