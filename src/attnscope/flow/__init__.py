"""`attnscope.flow`: where information flows between token sets, measured by attention knockout.

    curve = attnscope.flow.knockout_curve(model, "Is there a bag in the image?", image=scene.image, window=4)
    curve.to_dict(); curve.save("flow.png"); curve.mean("image->question")

`knockout_curve` blocks attention from one token set to another (`sets.SETS`: image, question, subject, other,
last) in a sliding window of layers (`steer.Knockout`) and returns a `KnockoutCurve`: the answer's relative
probability change per window. It sits beside `evaluate` in the data flow: it runs steer edits and measures."""
from .curve import CurveFileError, KnockoutCurve, flow_name
from .knockout import TEXT_FLOWS, VLM_FLOWS, knockout_curve, knockout_inputs, parse_flows
from .sets import SETS, TokenSetError, token_sets

__all__ = ["knockout_curve", "knockout_inputs", "KnockoutCurve", "CurveFileError", "token_sets", "SETS", "TokenSetError", "VLM_FLOWS", "TEXT_FLOWS",
           "parse_flows", "flow_name"]
