"""The output folder, the writer's side: a Delta Lake table of latents plus a shards table
(table/folder.py), the files written into it, the folder's totals and its lease. What a trainer
imports lives in encoder_service.reader."""
