"""The Mistral / Mixtral decoder that training, chat and export share; usable alone (imports nothing from finetune).

Import what you use from its module (`from model.loading import load_model`): importing the package loads nothing
else, so a part of tailor that needs one module (the config needs model.lora) does not load the whole model.
"""
