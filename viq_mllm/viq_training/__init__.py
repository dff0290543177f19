"""Training the ViQ tokenizer: the stage objectives, teachers, what each stage trains, hand-offs between stages, the decoder stage and reconstruction metrics (torch only, as the model)."""
