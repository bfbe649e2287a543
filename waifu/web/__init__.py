"""`waifu web`: one small web application to see, label and clean faces, and to watch the collection and
the models. Pages are thin routes over plain functions (queries.py, versions.py, pictures.py,
labels.manual, waifu.status)."""
