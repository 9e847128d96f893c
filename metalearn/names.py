"""The names of the algorithm variants, task types and head initialisations.

Kept free of torch so that ``metalearn --help`` and a bad flag answer at once
(importing torch takes about 2 s); ``metalearn.learner`` checks configs against them.
"""

ALGORITHMS = ("maml", "fomaml", "reptile", "metasgd", "anil", "tamaml", "mamlpp")
TASK_TYPES = ("classification", "regression")
HEAD_INITS = ("learned", "prototypes")
