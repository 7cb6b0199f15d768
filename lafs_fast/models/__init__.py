"""Models: landmark CNN, ViT blocks, Part fViT, heads (CosFace, ArcFace, DINO), presets."""
from .heads import ArcFace, CosFace, DINOHead, WeightNormLinear  # noqa: F401
from .landmark_cnn import LandmarkCNN, normalize_landmarks  # noqa: F401
from .part_fvit import PartFViT, grid_landmarks  # noqa: F401
from .registry import PRESETS, create_model, list_models, model_config  # noqa: F401
from .vit import Attention, Block, Transformer  # noqa: F401
