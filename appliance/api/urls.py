from django.urls import path

from . import completions, openapi, responses, views

urlpatterns = [
    path("models", views.list_models, name="v1-models"),
    path("models/<path:name>", views.model_card, name="v1-model"),
    path("chat/completions", views.chat_completions, name="v1-chat-completions"),
    path("completions", completions.completions, name="v1-completions"),
    path("responses", responses.responses, name="v1-responses"),
    path("openapi.json", openapi.openapi, name="v1-openapi"),
]
