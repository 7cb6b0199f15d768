"""A depth-1 Part fViT without dropout or drop-path, for training-loop tests: their masks come
from each rank's (or each path's) own random stream, so runs compared with each other (world 1
and world 2, a resumed and a straight run, our loop and a hand-written one) must not draw them."""
from torch import nn

from lafs_fast.models import create_model


def dropout_free_model(name, **kw):
    model = create_model(name, depth=1, dropout=0.0, emb_dropout=0.0, drop_path=0.0, **kw)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model
