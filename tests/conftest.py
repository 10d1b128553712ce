import os

# No GPU on the project's machines: DeepSpeed's CPU accelerator, chosen up front (auto-detection
# prints a warning into captured stdout the first time deepspeed is imported).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
