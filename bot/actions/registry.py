"""The task actions of this process, built once from the settings."""

from __future__ import annotations

from bot.actions.base import Action
from bot.actions.kube_client import api_client_factory, choose_backend
from bot.actions.kubernetes_deployment import KubernetesDeploymentAction
from bot.actions.kubernetes_job import KubernetesJobAction
from bot.actions.local_backend import LocalDeploymentAction, LocalJobAction
from bot.actions.webhook import WebhookAction
from bot.config import Settings


def build_actions(settings: Settings) -> dict[str, Action]:
    """Return the actions by name, with the Kubernetes ones on the chosen backend.

    Raises ConfigError when KUBECI_BACKEND or KUBECI_KUBECONFIG contains an unusable value.
    """
    actions: dict[str, Action] = {}
    if choose_backend(settings) == "kubernetes":
        factory = api_client_factory(settings)
        actions["kubernetes_job"] = KubernetesJobAction(settings, factory)
        actions["kubernetes_deployment"] = KubernetesDeploymentAction(settings, factory)
    else:
        actions["kubernetes_job"] = LocalJobAction(settings)
        actions["kubernetes_deployment"] = LocalDeploymentAction(settings)
    actions["webhook"] = WebhookAction(settings)
    return actions
