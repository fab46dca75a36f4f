from django.urls import path

from . import api

urlpatterns = [
    path("models", api.list_models, name="v1-models"),
    path("chat/completions", api.chat_completions, name="v1-chat-completions"),
]
