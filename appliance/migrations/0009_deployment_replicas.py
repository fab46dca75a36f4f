from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('appliance', '0008_deployment_node'),
    ]

    operations = [
        migrations.AddField(
            model_name='deployment',
            name='replicas',
            field=models.JSONField(blank=True, default=list),
        ),
    ]
