"""An echo predictor for Cog's runtime (coglet), for lb-bench: `python -m cog.server.http` with
COG_PREDICT_TYPE_STUB=predict.py:Predictor in this directory."""

from cog import BasePredictor, Input


class Predictor(BasePredictor):
    def setup(self) -> None:
        pass

    def predict(self, prompt: str = Input(description="echoed back")) -> str:
        return prompt
