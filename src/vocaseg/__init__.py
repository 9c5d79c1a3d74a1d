"""vocaseg: segment any image into the classes you name, with CLIP and no pixel labels."""

from .backbone import RULES as METHODS
from .dense import Classifier, DenseModel
from .inference import InferenceConfig, SegmentationResult, Segmenter
from .loading import WeightsUnavailableError, load_clip
from .vocabulary import Vocabulary, VocabularyError

__version__ = "0.1.0"
__all__ = ["Segmenter", "SegmentationResult", "InferenceConfig", "Vocabulary", "VocabularyError",
           "WeightsUnavailableError", "load_clip", "METHODS", "DenseModel", "Classifier", "__version__"]
