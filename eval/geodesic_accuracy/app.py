from pathlib import Path

import evaluate
from evaluate.utils import launch_gradio_widget


# The module script beside this file: a Space runs it from its own folder, whose name is not the metric's.
module = evaluate.load(str(Path(__file__).resolve().with_name("geodesic_accuracy.py")))
launch_gradio_widget(module)
