"""siked's data: the four datasets (data/prepare.py) and the teacher stage (data/teacher.py)."""
